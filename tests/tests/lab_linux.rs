//! The stock Debian kernel under ferro-vmm, inside the KVM lab (emulated AMD-V, real kvm_amd):
//! vmlinux (PVH and 64-bit boot protocol) and bzImage, 1 and 4 vCPUs, the memory asked for;
//! power-off and reboot end ferro-vmm with 0, a panic with 3.

use std::collections::BTreeMap;

use ferro_tests::{build_linux_guest, lab_available, lab_check, vmm};

/// One `case=NAME rc=N panic_lines=N linux-probe: cpus=N mem_kb=N ...` line, as a map.
fn parse(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn debian_kernel_boots_in_the_lab() {
    if !lab_available() {
        return;
    }
    build_linux_guest();
    let add = format!("{}:/bin/ferro-vmm", vmm().display());
    let adds = [add];
    lab_check("linux_boot.sh", &adds, 900, |console| {
        assert!(console.contains("lab-cases: done"), "{console}");
        let cases: BTreeMap<String, BTreeMap<String, String>> = console
            .lines()
            .filter(|l| l.starts_with("case="))
            .map(|l| {
                let m = parse(l);
                (m["case"].clone(), m)
            })
            .collect();
        let expect = [
            ("vmlinux-pvh-1cpu", 1, 256),
            ("vmlinux-linux64-1cpu", 1, 256),
            ("vmlinux-pvh-4cpu", 4, 512),
            ("bzimage-1cpu", 1, 256),
            ("bzimage-4cpu", 4, 1024),
            ("reboot", 2, 256),
        ];
        for (name, cpus, mib) in expect {
            let c = cases
                .get(name)
                .unwrap_or_else(|| panic!("case {name} missing:\n{console}"));
            assert_eq!(c["rc"], "0", "{name}: {console}");
            assert_eq!(c["cpus"], cpus.to_string(), "{name}");
            let kb: u64 = c["mem_kb"].parse().expect("mem_kb");
            // The kernel reports what is left after itself and its reservations.
            assert!(
                kb > mib * 1024 * 3 / 4 && kb <= mib * 1024,
                "{name}: {kb} kB of {mib} MiB"
            );
        }
        let panic = &cases["panic"];
        assert_eq!(panic["rc"], "3", "panic: {console}");
    });
}
