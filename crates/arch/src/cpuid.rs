//! CPUID for one vCPU, derived from what `KVM_GET_SUPPORTED_CPUID` reports.
//!
//! What the guest is told:
//! - Identity: the initial APIC id (leaf 0x1) and x2APIC id (0xB, 0x1F, AMD 0x8000001E) are
//!   `cpu_index`, matching the MADT, which numbers APIC ids `0..cpu_count`.
//! - Topology: one socket of `cpu_count` cores, one thread per core, one shared last-level cache.
//!   It is written into every place an OS reads it — Intel leaves 0x4, 0xB, 0x1F and AMD leaves
//!   0x80000001 (CmpLegacy, TopoExt), 0x80000008, 0x8000001D, 0x8000001E — because the host's
//!   real topology (KVM passes some of it through) would contradict the vCPU count.
//! - It runs under a hypervisor (leaf 0x1 ECX bit 31) which is KVM (0x40000000), and, when the
//!   TSC frequency is known, the timing leaf 0x40000010 (TSC kHz, APIC bus kHz) so the guest does
//!   not calibrate.
//! - No power management beyond ARAT (leaf 0x6) and no vPMU (leaf 0xA and the AMD counterparts).
//! - TSC-deadline mode is always offered: the VMM uses KVM's in-kernel local APIC, which
//!   emulates it whatever the host has.
//! - OSXSAVE and OSPKE are cleared: they mirror CR4 and KVM updates them when the guest sets it.
//!
//! Per [`Backend`], [`hidden_features`] lists what is masked. On PVM (KVM in software, guest
//! kernel code emulated at CPL0) that is every feature whose instructions or state the emulator
//! cannot honour — measured: `lock cmpxchg16b` and `xrstor` spin — and so everything that needs
//! XSAVE. Hardware and nested KVM keep everything KVM reports.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Largest vCPU count the topology leaves can express (8-bit xAPIC ids, 0xff is broadcast).
pub const MAX_CPUS: u32 = 255;

/// The KVM paravirtual signature, "KVMKVMKVM\0\0\0", as EBX, ECX, EDX of leaf 0x40000000.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
/// Hypervisor leaf base.
const HYPERVISOR_BASE: u32 = 0x4000_0000;
/// KVM's feature leaf.
const KVM_FEATURES: u32 = 0x4000_0001;
/// Timing leaf: EAX = TSC kHz, EBX = APIC bus kHz.
const HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer counts at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// How the host runs guests; decides which CPU features the guest may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// KVM on hardware virtualisation (VMX or SVM).
    Hardware,
    /// PVM: KVM without hardware virtualisation; guest CPL0 code is emulated.
    Pvm,
    /// KVM nested inside a VM (hardware virtualisation offered by an outer hypervisor).
    Nested,
}

/// Describes the vCPU whose CPUID is being built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidConfig {
    /// Index of the vCPU, which is also its APIC id.
    pub cpu_index: u32,
    /// Number of vCPUs in the VM.
    pub cpu_count: u32,
    /// The host's kind of virtualisation.
    pub backend: Backend,
    /// The guest TSC frequency, announced in leaf 0x40000010 when known.
    pub tsc_khz: Option<u32>,
}

/// Errors from adjusting the CPUID entries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    /// The vCPU index or count cannot be described.
    #[error("vCPU {cpu_index} of {cpu_count}: counts must be 1..={MAX_CPUS} and the index below the count")]
    InvalidTopology {
        /// The requested vCPU index.
        cpu_index: u32,
        /// The requested vCPU count.
        cpu_count: u32,
    },
    /// KVM reported no leaf 0, so the vendor is unknown.
    #[error("the supported CPUID has no leaf 0")]
    NoVendorLeaf,
    /// Adding the hypervisor leaves would exceed KVM's entry limit.
    #[error("{0} CPUID entries exceed KVM's limit")]
    TooManyEntries(usize),
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// What hiding a feature clears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mask {
    /// One bit of one register of leaf `leaf`, sub-leaf `subleaf`.
    Bit {
        /// CPUID function.
        leaf: u32,
        /// CPUID index (0 for leaves without sub-leaves).
        subleaf: u32,
        /// Output register.
        register: Register,
        /// Bit number.
        bit: u8,
    },
    /// Every register of every sub-leaf of `leaf`.
    Leaf(u32),
}

/// A CPU feature hidden from guests on some backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiddenFeature {
    /// Linux's name for it (as in /proc/cpuinfo) or the leaf's name.
    pub name: &'static str,
    /// What is cleared.
    pub mask: Mask,
    /// Why it is hidden, in one line.
    pub reason: &'static str,
}

/// The vendor of the host CPU, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    Intel,
    /// AMD and Hygon, which share AMD's topology leaves.
    Amd,
    Other,
}

const fn bit(leaf: u32, subleaf: u32, register: Register, bit: u8) -> Mask {
    Mask::Bit {
        leaf,
        subleaf,
        register,
        bit,
    }
}

const NEEDS_XSAVE: &str = "needs XSAVE state, which is hidden";
const AVX512: &str = "AVX-512 state needs XSAVE, which is hidden";

use Register::{Eax, Ebx, Ecx, Edx};

/// Hidden on PVM.
const PVM_HIDDEN: &[HiddenFeature] = &[
    HiddenFeature {
        name: "cx16",
        mask: bit(0x1, 0, Ecx, 13),
        reason: "lock cmpxchg16b spins in PVM's CPL0 emulator (measured)",
    },
    HiddenFeature {
        name: "xsave",
        mask: bit(0x1, 0, Ecx, 26),
        reason: "xrstor spins in PVM's CPL0 emulator (measured)",
    },
    HiddenFeature {
        name: "xsave leaf 0xd",
        mask: Mask::Leaf(0xd),
        reason: "describes XSAVE state components; XSAVE is hidden",
    },
    HiddenFeature {
        name: "avx",
        mask: bit(0x1, 0, Ecx, 28),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "fma",
        mask: bit(0x1, 0, Ecx, 12),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "f16c",
        mask: bit(0x1, 0, Ecx, 29),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "pcid",
        mask: bit(0x1, 0, Ecx, 17),
        reason: "PVM's shadow MMU would have to honour CR3 no-flush and PCID tags; not verified",
    },
    HiddenFeature {
        name: "avx2",
        mask: bit(0x7, 0, Ebx, 5),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "invpcid",
        mask: bit(0x7, 0, Ebx, 10),
        reason: "goes with pcid",
    },
    HiddenFeature {
        name: "mpx",
        mask: bit(0x7, 0, Ebx, 14),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx512f",
        mask: bit(0x7, 0, Ebx, 16),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512dq",
        mask: bit(0x7, 0, Ebx, 17),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512ifma",
        mask: bit(0x7, 0, Ebx, 21),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512pf",
        mask: bit(0x7, 0, Ebx, 26),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512er",
        mask: bit(0x7, 0, Ebx, 27),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512cd",
        mask: bit(0x7, 0, Ebx, 28),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512bw",
        mask: bit(0x7, 0, Ebx, 30),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512vl",
        mask: bit(0x7, 0, Ebx, 31),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512vbmi",
        mask: bit(0x7, 0, Ecx, 1),
        reason: AVX512,
    },
    HiddenFeature {
        name: "pku",
        mask: bit(0x7, 0, Ecx, 3),
        reason: "PKRU is XSAVE-managed state",
    },
    HiddenFeature {
        name: "waitpkg",
        mask: bit(0x7, 0, Ecx, 5),
        reason: "umwait/tpause at CPL0 are not emulated by PVM",
    },
    HiddenFeature {
        name: "avx512_vbmi2",
        mask: bit(0x7, 0, Ecx, 6),
        reason: AVX512,
    },
    HiddenFeature {
        name: "shstk",
        mask: bit(0x7, 0, Ecx, 7),
        reason: "CET state is XSAVES-managed",
    },
    HiddenFeature {
        name: "vaes",
        mask: bit(0x7, 0, Ecx, 9),
        reason: "VEX/EVEX only: needs AVX",
    },
    HiddenFeature {
        name: "vpclmulqdq",
        mask: bit(0x7, 0, Ecx, 10),
        reason: "VEX/EVEX only: needs AVX",
    },
    HiddenFeature {
        name: "avx512_vnni",
        mask: bit(0x7, 0, Ecx, 11),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512_bitalg",
        mask: bit(0x7, 0, Ecx, 12),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512_vpopcntdq",
        mask: bit(0x7, 0, Ecx, 14),
        reason: AVX512,
    },
    HiddenFeature {
        name: "la57",
        mask: bit(0x7, 0, Ecx, 16),
        reason: "5-level paging under PVM's shadow MMU is not verified",
    },
    HiddenFeature {
        name: "rdpid",
        mask: bit(0x7, 0, Ecx, 22),
        reason: "guest CPL3 runs natively and would read the host's TSC_AUX (host CPU number)",
    },
    HiddenFeature {
        name: "avx512_4vnniw",
        mask: bit(0x7, 0, Edx, 2),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512_4fmaps",
        mask: bit(0x7, 0, Edx, 3),
        reason: AVX512,
    },
    HiddenFeature {
        name: "avx512_vp2intersect",
        mask: bit(0x7, 0, Edx, 8),
        reason: AVX512,
    },
    HiddenFeature {
        name: "ibt",
        mask: bit(0x7, 0, Edx, 20),
        reason: "CET state is XSAVES-managed",
    },
    HiddenFeature {
        name: "amx_bf16",
        mask: bit(0x7, 0, Edx, 22),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx512_fp16",
        mask: bit(0x7, 0, Edx, 23),
        reason: AVX512,
    },
    HiddenFeature {
        name: "amx_tile",
        mask: bit(0x7, 0, Edx, 24),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "amx_int8",
        mask: bit(0x7, 0, Edx, 25),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "arch_capabilities",
        mask: bit(0x7, 0, Edx, 29),
        reason: "MSR 0x10a cannot be read through PVM's KVM (QEMU -cpu host aborts on it)",
    },
    HiddenFeature {
        name: "avx_vnni",
        mask: bit(0x7, 1, Eax, 4),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx512_bf16",
        mask: bit(0x7, 1, Eax, 5),
        reason: AVX512,
    },
    HiddenFeature {
        name: "amx_fp16",
        mask: bit(0x7, 1, Eax, 21),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx_ifma",
        mask: bit(0x7, 1, Eax, 23),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx_vnni_int8",
        mask: bit(0x7, 1, Edx, 4),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx_ne_convert",
        mask: bit(0x7, 1, Edx, 5),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx_vnni_int16",
        mask: bit(0x7, 1, Edx, 10),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "avx10",
        mask: bit(0x7, 1, Edx, 19),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "amx leaf 0x1d",
        mask: Mask::Leaf(0x1d),
        reason: "AMX tile palette; AMX is hidden",
    },
    HiddenFeature {
        name: "amx leaf 0x1e",
        mask: Mask::Leaf(0x1e),
        reason: "AMX TMUL information; AMX is hidden",
    },
    HiddenFeature {
        name: "avx10 leaf 0x24",
        mask: Mask::Leaf(0x24),
        reason: "AVX10 vector lengths; AVX10 is hidden",
    },
    HiddenFeature {
        name: "xop",
        mask: bit(0x8000_0001, 0, Ecx, 11),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "lwp",
        mask: bit(0x8000_0001, 0, Ecx, 15),
        reason: NEEDS_XSAVE,
    },
    HiddenFeature {
        name: "fma4",
        mask: bit(0x8000_0001, 0, Ecx, 16),
        reason: NEEDS_XSAVE,
    },
];

/// The features hidden from guests on `backend`, for `ferro-vmm --host-info` to print.
pub fn hidden_features(backend: Backend) -> &'static [HiddenFeature] {
    match backend {
        Backend::Pvm => PVM_HIDDEN,
        Backend::Hardware | Backend::Nested => &[],
    }
}

/// Adjusts the entries from `KVM_GET_SUPPORTED_CPUID` for one vCPU.
pub fn configure_cpuid(cpuid: &mut CpuId, cfg: &CpuidConfig) -> Result<(), CpuidError> {
    if cfg.cpu_count == 0 || cfg.cpu_count > MAX_CPUS || cfg.cpu_index >= cfg.cpu_count {
        return Err(CpuidError::InvalidTopology {
            cpu_index: cfg.cpu_index,
            cpu_count: cfg.cpu_count,
        });
    }
    let mut entries = cpuid.as_slice().to_vec();
    let vendor = vendor(&entries)?;

    for feature in hidden_features(cfg.backend) {
        hide(&mut entries, feature.mask);
    }
    features_leaf(&mut entries, cfg);
    power_leaf(&mut entries);
    no_pmu(&mut entries);
    cache_leaf(&mut entries, 0x4, cfg.cpu_count);
    for leaf in [0xb, 0x1f] {
        x2apic_topology(&mut entries, leaf, cfg);
    }
    if vendor == Vendor::Amd {
        amd_topology(&mut entries, cfg);
    }
    hypervisor_leaves(&mut entries, cfg);

    *cpuid =
        CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries(entries.len()))?;
    Ok(())
}

fn vendor(entries: &[kvm_cpuid_entry2]) -> Result<Vendor, CpuidError> {
    let leaf0 = entries
        .iter()
        .find(|e| e.function == 0)
        .ok_or(CpuidError::NoVendorLeaf)?;
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    Ok(match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    })
}

/// All sub-leaves of `leaf`.
fn leaves(
    entries: &mut [kvm_cpuid_entry2],
    leaf: u32,
) -> impl Iterator<Item = &mut kvm_cpuid_entry2> {
    entries.iter_mut().filter(move |e| e.function == leaf)
}

/// Sub-leaf `subleaf` of `leaf`; an entry KVM marks as having no sub-leaves stands for sub-leaf 0.
fn entry(
    entries: &mut [kvm_cpuid_entry2],
    leaf: u32,
    subleaf: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    let has_no_subleaves = |e: &kvm_cpuid_entry2| e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0;
    entries.iter_mut().find(|e| {
        e.function == leaf && (e.index == subleaf || (subleaf == 0 && has_no_subleaves(e)))
    })
}

fn register(e: &mut kvm_cpuid_entry2, r: Register) -> &mut u32 {
    match r {
        Eax => &mut e.eax,
        Ebx => &mut e.ebx,
        Ecx => &mut e.ecx,
        Edx => &mut e.edx,
    }
}

fn set_bit(value: &mut u32, bit: u8, on: bool) {
    if on {
        *value |= 1 << bit;
    } else {
        *value &= !(1 << bit);
    }
}

/// Replaces bits `lo..=hi` of `value` with `field` (truncated to fit).
fn set_field(value: &mut u32, lo: u8, hi: u8, field: u32) {
    let mask = (u32::MAX >> (31 - hi)) & (u32::MAX << lo);
    *value = (*value & !mask) | ((field << lo) & mask);
}

fn zero(e: &mut kvm_cpuid_entry2) {
    e.eax = 0;
    e.ebx = 0;
    e.ecx = 0;
    e.edx = 0;
}

fn hide(entries: &mut [kvm_cpuid_entry2], mask: Mask) {
    match mask {
        Mask::Bit {
            leaf,
            subleaf,
            register: r,
            bit,
        } => {
            if let Some(e) = entry(entries, leaf, subleaf) {
                set_bit(register(e, r), bit, false);
            }
        }
        Mask::Leaf(leaf) => leaves(entries, leaf).for_each(zero),
    }
}

/// Bits needed to number `count` ids: ceil(log2(count)).
fn id_bits(count: u32) -> u32 {
    u32::BITS - count.saturating_sub(1).leading_zeros()
}

/// Leaf 0x1 (and leaf 7's OSPKE): identity, counts and the bits the VMM owns.
fn features_leaf(entries: &mut [kvm_cpuid_entry2], cfg: &CpuidConfig) {
    const EDX_HTT: u8 = 28;
    const ECX_TSC_DEADLINE: u8 = 24;
    const ECX_OSXSAVE: u8 = 27;
    const ECX_HYPERVISOR: u8 = 31;
    const ECX_PDCM: u8 = 15;
    const LEAF7_ECX_OSPKE: u8 = 4;

    if let Some(e) = entry(entries, 0x1, 0) {
        // EBX: [7:0] brand index and [15:8] CLFLUSH line size are kept.
        set_field(&mut e.ebx, 16, 23, cfg.cpu_count);
        set_field(&mut e.ebx, 24, 31, cfg.cpu_index);
        set_bit(&mut e.edx, EDX_HTT, cfg.cpu_count > 1);
        set_bit(&mut e.ecx, ECX_TSC_DEADLINE, true);
        set_bit(&mut e.ecx, ECX_OSXSAVE, false);
        set_bit(&mut e.ecx, ECX_HYPERVISOR, true);
        // Perfmon and debug capability MSR: there is no vPMU.
        set_bit(&mut e.ecx, ECX_PDCM, false);
    }
    if let Some(e) = entry(entries, 0x7, 0) {
        set_bit(&mut e.ecx, LEAF7_ECX_OSPKE, false);
    }
}

/// Leaf 0x6: only ARAT (the APIC timer keeps running in deep C-states), no P-state hardware.
fn power_leaf(entries: &mut [kvm_cpuid_entry2]) {
    const EAX_ARAT: u32 = 1 << 2;
    for e in leaves(entries, 0x6) {
        let arat = e.eax & EAX_ARAT;
        zero(e);
        e.eax = arat;
    }
}

/// No vPMU: Intel's architectural PMU leaves and AMD's counter extensions are cleared.
fn no_pmu(entries: &mut [kvm_cpuid_entry2]) {
    const AMD_ECX_PERFCTR_CORE: u8 = 23;
    const AMD_ECX_PERFCTR_NB: u8 = 24;
    const AMD_ECX_PERFCTR_LLC: u8 = 28;
    for leaf in [0xa, 0x23, 0x8000_0022] {
        leaves(entries, leaf).for_each(zero);
    }
    if let Some(e) = entry(entries, 0x8000_0001, 0) {
        for b in [
            AMD_ECX_PERFCTR_CORE,
            AMD_ECX_PERFCTR_NB,
            AMD_ECX_PERFCTR_LLC,
        ] {
            set_bit(&mut e.ecx, b, false);
        }
    }
}

/// Deterministic cache parameters (Intel 0x4, AMD 0x8000001D): caches up to L2 are private to a
/// core, L3 and beyond are shared by all. Intel's 0x4 also gives cores per package - 1.
fn cache_leaf(entries: &mut [kvm_cpuid_entry2], leaf: u32, cpu_count: u32) {
    for e in leaves(entries, leaf) {
        let cache_type = e.eax & 0x1f;
        if cache_type == 0 {
            continue;
        }
        let level = (e.eax >> 5) & 0x7;
        let sharing = if level >= 3 { cpu_count - 1 } else { 0 };
        set_field(&mut e.eax, 14, 25, sharing);
        if leaf == 0x4 {
            set_field(&mut e.eax, 26, 31, (cpu_count - 1).min(63));
        }
    }
}

/// Extended topology (0xB, 0x1F): SMT level with 1 thread, core level with `cpu_count` logical
/// processors, then the invalid level that ends the list. Replaces the host's sub-leaves if KVM
/// reported the leaf at all.
fn x2apic_topology(entries: &mut Vec<kvm_cpuid_entry2>, leaf: u32, cfg: &CpuidConfig) {
    const LEVEL_INVALID: u32 = 0;
    const LEVEL_SMT: u32 = 1;
    const LEVEL_CORE: u32 = 2;
    if !entries.iter().any(|e| e.function == leaf) {
        return;
    }
    entries.retain(|e| e.function != leaf);
    let levels = [
        (0, 1, LEVEL_SMT),
        (id_bits(cfg.cpu_count), cfg.cpu_count, LEVEL_CORE),
        (0, 0, LEVEL_INVALID),
    ];
    for (index, (shift, count, kind)) in (0u32..).zip(levels) {
        entries.push(kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: shift,
            ebx: count,
            ecx: (kind << 8) | index,
            edx: cfg.cpu_index,
            ..Default::default()
        });
    }
}

/// AMD's topology leaves: core count and APIC id width (0x80000008), per-core ids (0x8000001E),
/// cache sharing (0x8000001D), and the CmpLegacy/TopoExt bits that say they are valid.
fn amd_topology(entries: &mut [kvm_cpuid_entry2], cfg: &CpuidConfig) {
    const ECX_CMP_LEGACY: u8 = 1;
    const ECX_TOPOEXT: u8 = 22;

    let has_topoext_leaves = [0x8000_001d, 0x8000_001e]
        .iter()
        .all(|leaf| entries.iter().any(|e| e.function == *leaf));
    if let Some(e) = entry(entries, 0x8000_0001, 0) {
        // CmpLegacy: HTT and 0x80000008's NC count cores, not hyper-threads.
        set_bit(&mut e.ecx, ECX_CMP_LEGACY, cfg.cpu_count > 1);
        if !has_topoext_leaves {
            set_bit(&mut e.ecx, ECX_TOPOEXT, false);
        }
    }
    if let Some(e) = entry(entries, 0x8000_0008, 0) {
        e.ecx = 0;
        set_field(&mut e.ecx, 0, 7, cfg.cpu_count - 1);
        set_field(&mut e.ecx, 12, 15, id_bits(cfg.cpu_count));
    }
    cache_leaf(entries, 0x8000_001d, cfg.cpu_count);
    if let Some(e) = entry(entries, 0x8000_001e, 0) {
        zero(e);
        // Extended APIC id; EBX: core (compute unit) id, 1 thread per core (field is count - 1);
        // ECX: node 0, 1 node per processor (field is count - 1).
        e.eax = cfg.cpu_index;
        set_field(&mut e.ebx, 0, 7, cfg.cpu_index);
    }
}

/// 0x40000000 (KVM signature, highest hypervisor leaf), 0x40000001 kept as KVM reports it, and
/// 0x40000010 (timing) when the TSC frequency is known.
fn hypervisor_leaves(entries: &mut Vec<kvm_cpuid_entry2>, cfg: &CpuidConfig) {
    entries.retain(|e| e.function != HYPERVISOR_BASE && e.function != HYPERVISOR_TIMING);
    let highest_reported = entries
        .iter()
        .map(|e| e.function)
        .filter(|f| (HYPERVISOR_BASE..HYPERVISOR_BASE + 0x100).contains(f))
        .max()
        .unwrap_or(KVM_FEATURES)
        .max(KVM_FEATURES);
    let max_leaf = match cfg.tsc_khz {
        Some(tsc_khz) => {
            entries.push(kvm_cpuid_entry2 {
                function: HYPERVISOR_TIMING,
                eax: tsc_khz,
                ebx: APIC_BUS_KHZ,
                ..Default::default()
            });
            highest_reported.max(HYPERVISOR_TIMING)
        }
        None => highest_reported,
    };
    let [ebx, ecx, edx] = KVM_SIGNATURE;
    entries.push(kvm_cpuid_entry2 {
        function: HYPERVISOR_BASE,
        eax: max_leaf,
        ebx,
        ecx,
        edx,
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIG: u32 = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn bits(list: &[u8]) -> u32 {
        list.iter().fold(0, |acc, b| acc | (1 << b))
    }

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sub(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            flags: SIG,
            ..e(function, index, regs)
        }
    }

    /// Vendor string as EBX, EDX, ECX.
    fn vendor_regs(name: &[u8; 12]) -> [u32; 3] {
        let word = |i: usize| u32::from_le_bytes([name[i], name[i + 1], name[i + 2], name[i + 3]]);
        [word(0), word(4), word(8)]
    }

    fn leaf1_ecx() -> u32 {
        // sse3 pclmul ssse3 fma cx16 pdcm pcid sse4.1 sse4.2 x2apic movbe popcnt aes xsave
        // osxsave avx f16c rdrand
        bits(&[
            0, 1, 9, 12, 13, 15, 17, 19, 20, 21, 22, 23, 25, 26, 27, 28, 29, 30,
        ])
    }

    fn leaf7() -> [u32; 4] {
        let ebx = bits(&[
            0, 3, 5, 7, 8, 10, 16, 17, 18, 19, 20, 21, 23, 24, 28, 29, 30, 31,
        ]);
        let ecx = bits(&[1, 2, 3, 4, 5, 6, 9, 10, 11, 12, 14, 16, 22]);
        let edx = bits(&[4, 29]);
        [1, ebx, ecx, edx]
    }

    fn kvm_leaves() -> Vec<kvm_cpuid_entry2> {
        let [ebx, ecx, edx] = KVM_SIGNATURE;
        vec![
            e(HYPERVISOR_BASE, 0, [KVM_FEATURES, ebx, ecx, edx]),
            // clocksource, nop_io_delay, mmu_op, clocksource2, async_pf, steal_time, pv_eoi,
            // pv_unhalt, ...; EDX: no hints.
            e(KVM_FEATURES, 0, [0x0100_7afb, 0, 0, 0]),
        ]
    }

    /// What KVM_GET_SUPPORTED_CPUID reports on an EPYC (Zen 4) host, abridged.
    fn amd_entries() -> Vec<kvm_cpuid_entry2> {
        let [vb, vd, vc] = vendor_regs(b"AuthenticAMD");
        let mut v = vec![
            e(0, 0, [0x10, vb, vc, vd]),
            e(1, 0, [0x00a1_0f11, 0x3f20_0800, leaf1_ecx(), 0x178b_fbff]),
            sub(0x4, 0, [0; 4]),
            e(0x6, 0, [0x7, 0, 1, 0]),
            sub(0x7, 0, leaf7()),
            sub(0x7, 1, [bits(&[4, 5]), 0, 0, 0]),
            e(0xa, 0, [0; 4]),
            sub(0xb, 0, [1, 2, 0x100, 0x3f]),
            sub(0xb, 1, [7, 0x40, 0x201, 0x3f]),
            sub(0xb, 2, [0, 0, 2, 0x3f]),
            sub(0xd, 0, [0x2e7, 0x980, 0x988, 0]),
            sub(0xd, 1, [0xf, 0x348, 0, 0]),
            sub(0xd, 2, [0x100, 0x240, 0, 0]),
            e(0x8000_0000, 0, [0x8000_0022, vb, vc, vd]),
            // lahf_lm cmp_legacy svm abm sse4a misalignsse 3dnowprefetch topoext perfctr_core
            e(
                0x8000_0001,
                0,
                [
                    0x00a1_0f11,
                    0,
                    bits(&[0, 1, 2, 5, 6, 7, 8, 22, 23]),
                    0x2fd3_fbff,
                ],
            ),
            e(0x8000_0008, 0, [0x3030, 0x0101_d205, 0x0000_703f, 0]),
            sub(0x8000_001d, 0, [0x0000_4121, 0x01c0_003f, 0x3f, 0]),
            sub(0x8000_001d, 1, [0x0000_4122, 0x01c0_003f, 0x3f, 0]),
            sub(0x8000_001d, 2, [0x0000_4143, 0x01c0_003f, 0x7ff, 2]),
            sub(0x8000_001d, 3, [0x0003_c163, 0x03c0_003f, 0x7fff, 1]),
            sub(0x8000_001d, 4, [0; 4]),
            e(0x8000_001e, 0, [0x3f, 0x011f, 0x0000_0303, 0]),
            e(0x8000_0022, 0, [0x7, 0x0000_0006, 0, 0]),
        ];
        v.extend(kvm_leaves());
        v
    }

    /// What KVM_GET_SUPPORTED_CPUID reports on a Sapphire Rapids host, abridged.
    fn intel_entries() -> Vec<kvm_cpuid_entry2> {
        let [vb, vd, vc] = vendor_regs(b"GenuineIntel");
        let mut v = vec![
            e(0, 0, [0x1f, vb, vc, vd]),
            e(1, 0, [0x0008_06f8, 0x0040_0800, leaf1_ecx(), 0x1f8b_fbff]),
            sub(0x4, 0, [0xfc00_4121, 0x02c0_003f, 0x3f, 0]),
            sub(0x4, 1, [0xfc00_4122, 0x01c0_003f, 0x3f, 0]),
            sub(0x4, 2, [0xfc00_4143, 0x03c0_003f, 0x7ff, 0]),
            sub(0x4, 3, [0xfc3f_c163, 0x03c0_003f, 0xdfff, 4]),
            sub(0x4, 4, [0; 4]),
            e(0x6, 0, [0x4, 0, 0, 0]),
            sub(0x7, 0, leaf7()),
            sub(0x7, 1, [bits(&[4, 5, 21, 23]), 0, 0, bits(&[4, 5, 10, 19])]),
            e(0xa, 0, [0x0830_0805, 0, 0, 0x603]),
            sub(0xb, 0, [1, 2, 0x100, 0x40]),
            sub(0xb, 1, [7, 0x70, 0x201, 0x40]),
            sub(0xb, 2, [0, 0, 2, 0x40]),
            sub(0xd, 0, [0x602e7, 0xa88, 0x2b00, 0]),
            sub(0x1d, 0, [1, 0, 0, 0]),
            sub(0x1d, 1, [0x0400_2000, 0x0008_0040, 0x10, 0]),
            e(0x1e, 0, [0, 0x4002, 0, 0]),
            sub(0x1f, 0, [1, 2, 0x100, 0x40]),
            sub(0x1f, 1, [7, 0x70, 0x201, 0x40]),
            sub(0x1f, 2, [8, 0xe0, 0x502, 0x40]),
            sub(0x1f, 3, [0, 0, 3, 0x40]),
            e(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            e(
                0x8000_0001,
                0,
                [0, 0, bits(&[0, 5, 8]), bits(&[11, 20, 26, 27, 29])],
            ),
            e(0x8000_0008, 0, [0x3039, 0, 0, 0]),
        ];
        v.extend(kvm_leaves());
        v
    }

    fn configure(
        entries: &[kvm_cpuid_entry2],
        cpu_index: u32,
        cpu_count: u32,
        backend: Backend,
        tsc_khz: Option<u32>,
    ) -> Vec<kvm_cpuid_entry2> {
        let mut cpuid = CpuId::from_entries(entries).expect("fixture fits");
        let cfg = CpuidConfig {
            cpu_index,
            cpu_count,
            backend,
            tsc_khz,
        };
        configure_cpuid(&mut cpuid, &cfg).expect("valid configuration");
        cpuid.as_slice().to_vec()
    }

    fn get(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} present"))
    }

    fn all_subleaves(entries: &[kvm_cpuid_entry2], function: u32) -> Vec<kvm_cpuid_entry2> {
        let mut v: Vec<_> = entries
            .iter()
            .filter(|e| e.function == function)
            .copied()
            .collect();
        v.sort_by_key(|e| e.index);
        v
    }

    fn has(value: u32, bit: u8) -> bool {
        value & (1 << bit) != 0
    }

    #[test]
    fn apic_ids_are_the_cpu_index() {
        for cpu in [0, 31] {
            let amd = configure(&amd_entries(), cpu, 32, Backend::Hardware, None);
            assert_eq!(get(&amd, 1, 0).ebx >> 24, cpu, "initial APIC id");
            assert_eq!(get(&amd, 0x8000_001e, 0).eax, cpu, "extended APIC id");
            assert_eq!(get(&amd, 0x8000_001e, 0).ebx & 0xff, cpu, "core id");
            for level in 0..3 {
                assert_eq!(get(&amd, 0xb, level).edx, cpu, "x2APIC id");
            }
            let intel = configure(&intel_entries(), cpu, 32, Backend::Hardware, None);
            assert_eq!(get(&intel, 1, 0).ebx >> 24, cpu);
            for leaf in [0xb, 0x1f] {
                for level in 0..3 {
                    assert_eq!(get(&intel, leaf, level).edx, cpu, "{leaf:#x}.{level}");
                }
            }
        }
    }

    #[test]
    fn extended_topology_is_one_socket_of_cores() {
        for fixture in [amd_entries(), intel_entries()] {
            let out = configure(&fixture, 5, 32, Backend::Hardware, None);
            let leaves: &[u32] = if get(&out, 0, 0).eax >= 0x1f {
                &[0xb, 0x1f]
            } else {
                &[0xb]
            };
            for &leaf in leaves {
                let levels = all_subleaves(&out, leaf);
                assert_eq!(levels.len(), 3, "SMT, core, end; host's extra levels gone");
                let regs = |e: &kvm_cpuid_entry2| (e.eax, e.ebx, e.ecx);
                assert_eq!(regs(&levels[0]), (0, 1, 0x100), "SMT: shift 0, 1 thread");
                assert_eq!(regs(&levels[1]), (5, 32, 0x201), "core: shift 5, 32 CPUs");
                assert_eq!(regs(&levels[2]), (0, 0, 2), "invalid level ends the list");
                assert!(levels.iter().all(|e| e.flags == SIG));
            }
            let leaf1 = get(&out, 1, 0);
            assert_eq!((leaf1.ebx >> 16) & 0xff, 32, "logical processor count");
            assert_eq!((leaf1.ebx >> 8) & 0xff, 8, "CLFLUSH line size kept");
            assert!(has(leaf1.edx, 28), "HTT with several CPUs");
        }
    }

    #[test]
    fn core_shift_rounds_up_to_a_power_of_two() {
        for (count, shift) in [
            (1, 0),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (31, 5),
            (32, 5),
            (33, 6),
        ] {
            let out = configure(&intel_entries(), 0, count, Backend::Hardware, None);
            assert_eq!(get(&out, 0xb, 1).eax, shift, "{count} CPUs");
            assert_eq!(get(&out, 0xb, 1).ebx, count);
        }
    }

    #[test]
    fn one_cpu_has_no_htt_or_cmp_legacy() {
        let amd = configure(&amd_entries(), 0, 1, Backend::Hardware, None);
        assert!(!has(get(&amd, 1, 0).edx, 28));
        assert_eq!((get(&amd, 1, 0).ebx >> 16) & 0xff, 1);
        assert!(!has(get(&amd, 0x8000_0001, 0).ecx, 1));
        assert_eq!(get(&amd, 0x8000_0008, 0).ecx, 0, "NC 0, legacy id size");
        assert_eq!(get(&amd, 0xb, 1).eax, 0);
    }

    #[test]
    fn intel_cache_leaf_counts_cores_and_sharing() {
        let out = configure(&intel_entries(), 0, 32, Backend::Hardware, None);
        let caches = all_subleaves(&out, 0x4);
        assert_eq!(caches.len(), 5);
        let input = all_subleaves(&intel_entries(), 0x4);
        for (cache, host) in caches[..4].iter().zip(&input) {
            let level = (cache.eax >> 5) & 7;
            let sharing = (cache.eax >> 14) & 0xfff;
            assert_eq!(cache.eax >> 26, 31, "cores per package - 1");
            assert_eq!(sharing, if level == 3 { 31 } else { 0 }, "L{level}");
            assert_eq!(
                cache.eax & 0x3fff,
                host.eax & 0x3fff,
                "type, level, flags kept"
            );
            assert_eq!(
                (cache.ebx, cache.ecx, cache.edx),
                (host.ebx, host.ecx, host.edx)
            );
        }
        assert_eq!(caches[4].eax, 0, "null cache ends the list");
    }

    #[test]
    fn amd_topology_leaves_agree() {
        let out = configure(&amd_entries(), 7, 32, Backend::Hardware, None);
        let ext1 = get(&out, 0x8000_0001, 0);
        assert!(has(ext1.ecx, 1), "CmpLegacy");
        assert!(has(ext1.ecx, 22), "TopoExt kept: its leaves are filled in");
        let ecx = get(&out, 0x8000_0008, 0).ecx;
        assert_eq!(ecx & 0xff, 31, "NC");
        assert_eq!((ecx >> 12) & 0xf, 5, "ApicIdCoreIdSize");
        let ids = get(&out, 0x8000_001e, 0);
        assert_eq!((ids.eax, ids.ebx, ids.ecx, ids.edx), (7, 7, 0, 0));
        for cache in all_subleaves(&out, 0x8000_001d)
            .iter()
            .filter(|c| c.eax & 0x1f != 0)
        {
            let level = (cache.eax >> 5) & 7;
            let sharing = (cache.eax >> 14) & 0xfff;
            assert_eq!(sharing, if level == 3 { 31 } else { 0 }, "L{level}");
        }
    }

    #[test]
    fn topoext_is_cleared_without_its_leaves() {
        let fixture: Vec<_> = amd_entries()
            .into_iter()
            .filter(|e| e.function != 0x8000_001e)
            .collect();
        let out = configure(&fixture, 0, 4, Backend::Hardware, None);
        assert!(!has(get(&out, 0x8000_0001, 0).ecx, 22));
    }

    #[test]
    fn intel_keeps_its_reserved_amd_fields() {
        let out = configure(&intel_entries(), 3, 8, Backend::Hardware, None);
        assert_eq!(get(&out, 0x8000_0008, 0).ecx, 0);
        assert_eq!(get(&out, 0x8000_0001, 0).ecx, bits(&[0, 5, 8]));
    }

    #[test]
    fn leaf_1_flags_the_vmm_owns() {
        for backend in [Backend::Hardware, Backend::Pvm, Backend::Nested] {
            let out = configure(&amd_entries(), 0, 2, backend, None);
            let ecx = get(&out, 1, 0).ecx;
            assert!(has(ecx, 31), "hypervisor");
            assert!(has(ecx, 24), "TSC deadline");
            assert!(!has(ecx, 27), "OSXSAVE follows CR4");
            assert!(has(ecx, 21), "x2APIC as KVM reports it");
            assert!(!has(ecx, 15), "PDCM: no vPMU");
            assert!(!has(get(&out, 7, 0).ecx, 4), "OSPKE follows CR4");
        }
        let mut no_x2apic = amd_entries();
        no_x2apic[1].ecx &= !(1 << 21);
        let out = configure(&no_x2apic, 0, 2, Backend::Hardware, None);
        assert!(!has(get(&out, 1, 0).ecx, 21));
    }

    #[test]
    fn power_and_pmu_leaves() {
        let intel = configure(&intel_entries(), 0, 2, Backend::Hardware, None);
        let amd = configure(&amd_entries(), 0, 2, Backend::Hardware, None);
        for out in [&intel, &amd] {
            let pm = get(out, 0x6, 0);
            assert_eq!((pm.eax, pm.ebx, pm.ecx, pm.edx), (4, 0, 0, 0), "ARAT only");
            let pmu = get(out, 0xa, 0);
            assert_eq!((pmu.eax, pmu.ebx, pmu.ecx, pmu.edx), (0, 0, 0, 0));
        }
        assert!(!has(get(&amd, 0x8000_0001, 0).ecx, 23), "perfctr_core");
        assert_eq!(get(&amd, 0x8000_0022, 0).eax, 0, "PerfMonV2");
    }

    /// Sets every bit the PVM list hides, so clearing is observable.
    fn with_hidden_bits_set(mut entries: Vec<kvm_cpuid_entry2>) -> Vec<kvm_cpuid_entry2> {
        for feature in PVM_HIDDEN {
            if let Mask::Bit {
                leaf,
                subleaf,
                register: r,
                bit,
            } = feature.mask
            {
                if let Some(e) = entry(&mut entries, leaf, subleaf) {
                    set_bit(register(e, r), bit, true);
                }
            }
        }
        entries
    }

    #[test]
    fn hidden_features_are_cleared_on_pvm_only() {
        for fixture in [amd_entries(), intel_entries()] {
            let input = with_hidden_bits_set(fixture);
            for backend in [Backend::Hardware, Backend::Pvm, Backend::Nested] {
                let mut out = configure(&input, 1, 4, backend, None);
                let hidden = backend == Backend::Pvm;
                for feature in PVM_HIDDEN {
                    match feature.mask {
                        Mask::Bit {
                            leaf,
                            subleaf,
                            register: r,
                            bit,
                        } => {
                            let Some(e) = entry(&mut out, leaf, subleaf) else {
                                continue;
                            };
                            assert_eq!(has(*register(e, r), bit), !hidden, "{}", feature.name);
                        }
                        Mask::Leaf(leaf) => {
                            for e in out.iter().filter(|e| e.function == leaf) {
                                let zeroed = (e.eax, e.ebx, e.ecx, e.edx) == (0, 0, 0, 0);
                                assert_eq!(zeroed, hidden, "{}", feature.name);
                            }
                        }
                    }
                }
                // Plain GPR and SSE features stay everywhere.
                assert!(has(get(&out, 7, 0).ebx, 3), "bmi1");
                assert!(has(get(&out, 1, 0).ecx, 20), "sse4.2");
            }
        }
    }

    #[test]
    fn hidden_feature_lists() {
        assert!(hidden_features(Backend::Hardware).is_empty());
        assert!(hidden_features(Backend::Nested).is_empty());
        let pvm = hidden_features(Backend::Pvm);
        for name in [
            "cx16", "xsave", "avx", "avx2", "avx512f", "pcid", "invpcid", "pku", "la57",
        ] {
            assert!(pvm.iter().any(|f| f.name == name), "{name}");
        }
        for (i, f) in pvm.iter().enumerate() {
            assert!(!f.reason.is_empty());
            assert!(pvm[..i]
                .iter()
                .all(|g| g.name != f.name && g.mask != f.mask));
        }
    }

    fn signature(entries: &[kvm_cpuid_entry2]) -> Vec<u8> {
        let base = get(entries, HYPERVISOR_BASE, 0);
        [base.ebx, base.ecx, base.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect()
    }

    #[test]
    fn hypervisor_leaves_name_kvm_and_keep_its_features() {
        let out = configure(&amd_entries(), 0, 2, Backend::Pvm, None);
        assert_eq!(signature(&out), b"KVMKVMKVM\0\0\0");
        assert_eq!(get(&out, HYPERVISOR_BASE, 0).eax, KVM_FEATURES);
        assert_eq!(
            get(&out, KVM_FEATURES, 0).eax,
            0x0100_7afb,
            "KVM's bits kept"
        );
        assert!(has(get(&out, KVM_FEATURES, 0).eax, 3), "CLOCKSOURCE2");
        assert!(!out.iter().any(|e| e.function == HYPERVISOR_TIMING));
        assert_eq!(
            out.iter().filter(|e| e.function == HYPERVISOR_BASE).count(),
            1
        );
    }

    #[test]
    fn tsc_frequency_adds_the_timing_leaf() {
        let out = configure(&intel_entries(), 0, 2, Backend::Hardware, Some(2_995_200));
        assert_eq!(signature(&out), b"KVMKVMKVM\0\0\0");
        assert_eq!(get(&out, HYPERVISOR_BASE, 0).eax, HYPERVISOR_TIMING);
        let timing = get(&out, HYPERVISOR_TIMING, 0);
        assert_eq!((timing.eax, timing.ebx), (2_995_200, 1_000_000));
    }

    #[test]
    fn configuring_twice_gives_the_same_result() {
        let once = configure(&amd_entries(), 2, 4, Backend::Pvm, Some(1_000_000));
        let twice = configure(&once, 2, 4, Backend::Pvm, Some(1_000_000));
        assert_eq!(once, twice);
    }

    #[test]
    fn invalid_configurations_are_refused() {
        let mut cpuid = CpuId::from_entries(&amd_entries()).expect("fixture fits");
        for (cpu_index, cpu_count) in [(0, 0), (4, 4), (0, MAX_CPUS + 1)] {
            let cfg = CpuidConfig {
                cpu_index,
                cpu_count,
                backend: Backend::Hardware,
                tsc_khz: None,
            };
            assert_eq!(
                configure_cpuid(&mut cpuid, &cfg),
                Err(CpuidError::InvalidTopology {
                    cpu_index,
                    cpu_count
                })
            );
        }
        let mut no_leaf0 = CpuId::from_entries(&amd_entries()[1..]).expect("fits");
        let cfg = CpuidConfig {
            cpu_index: 0,
            cpu_count: 1,
            backend: Backend::Hardware,
            tsc_khz: None,
        };
        assert_eq!(
            configure_cpuid(&mut no_leaf0, &cfg),
            Err(CpuidError::NoVendorLeaf)
        );
    }
}
