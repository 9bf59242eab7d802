//! From a [`VmConfig`] to a VM whose vCPUs are ready to run: memory, kernel, initrd, command
//! line, ACPI tables, boot structures, legacy devices, and vCPU state.

use std::sync::Arc;

use ferro_api::VmConfig;
use ferro_arch::acpi::{write_acpi_tables, AcpiConfig, PciAcpi};
use ferro_arch::boot::{write_linux_boot_params, write_pvh_start_info, LinuxBoot};
use ferro_arch::cpuid::{configure_cpuid, Backend, CpuidConfig};
use ferro_arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START};
use ferro_arch::regs::{self, Entry};
use ferro_hypervisor::{HostKind, Hypervisor, Vcpu, Vm};
use ferro_virtio::VirtioDevice;
use vm_memory::{Bytes, GuestAddress};

use crate::kernel::{self, BootProtocol, KernelEntry};
use crate::machine::{self, ExitLatch, Machine};
use crate::memory::{self, GuestMemory};
use crate::pci::PciDevices;
use crate::snapshot::{Loaded, MachineState};
use crate::{console, VmmError};
use ferro_arch::memory_map::RamLayout;

/// Choices that are not part of the VM's identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// How to enter ELF kernels.
    pub protocol: BootProtocol,
}

/// A VM ready to run. Fields drop in order: vCPUs and the VM before the memory they use.
pub struct BuiltVm {
    /// The vCPUs, index = APIC id; vCPU 0 is the boot processor.
    pub vcpus: Vec<Vcpu>,
    /// Legacy devices.
    pub machine: Machine,
    /// Where the end of the VM is announced.
    pub latch: Arc<ExitLatch>,
    /// The KVM VM (shared with the devices that route interrupts and place ioeventfds).
    pub vm: Arc<Vm>,
    /// Guest RAM.
    pub memory: GuestMemory,
    /// The /dev/kvm handle.
    pub hypervisor: Hypervisor,
}

fn backend(kind: HostKind) -> Backend {
    match kind {
        HostKind::Hardware => Backend::Hardware,
        HostKind::Nested => Backend::Nested,
        HostKind::Pvm => Backend::Pvm,
    }
}

/// What the devices need from the host, opened before KVM is touched (so bad input fails the
/// same way everywhere).
struct HostSide {
    disks: Vec<ferro_virtio::block::BlockConfig>,
    serial_out: Box<dyn std::io::Write + Send>,
    virtio: Vec<Box<dyn VirtioDevice>>,
    nets: Vec<crate::devices_net::NetInfo>,
}

fn host_side(cfg: &VmConfig) -> Result<HostSide, VmmError> {
    let disks = crate::devices_block::open_disks(&cfg.disks)?;
    let serial_out = console::output(&cfg.serial)?;
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let nets = crate::devices_net::create(&cfg.nets, &mut virtio)?;
    crate::devices_vsock::create(cfg.vsock.as_ref(), &mut virtio)?;
    Ok(HostSide {
        disks,
        serial_out,
        virtio,
        nets,
    })
}

/// Builds the VM a snapshot holds (configured as `cfg`, the snapshot's configuration with the
/// console chosen anew), ready to continue where it was saved: guest memory mapped from the
/// snapshot's memory file, devices, vCPUs and KVM's in-kernel state restored.
pub fn restore(cfg: &VmConfig, snap: &Loaded) -> Result<BuiltVm, VmmError> {
    cfg.validate()?;
    restore_from(cfg, &snap.state, snap.map_memory()?)
}

/// Builds the VM whose machine state is `state` and whose guest memory `mem` holds (a
/// snapshot's memory mapped from its file, or the memory a migration filled), ready to
/// continue: devices, vCPUs and KVM's in-kernel state restored.
pub fn restore_from(
    cfg: &VmConfig,
    state: &MachineState,
    mem: GuestMemory,
) -> Result<BuiltVm, VmmError> {
    cfg.validate()?;
    let HostSide {
        disks,
        serial_out,
        mut virtio,
        nets,
    } = host_side(cfg)?;
    let hypervisor = Hypervisor::new()?;
    let vm = Arc::new(hypervisor.create_vm()?);
    memory::register(&vm, &mem, cfg.memory_mib)?;
    let layout = RamLayout::new(cfg.memory_mib << 20);
    vm.setup_platform()?;
    let balloon =
        crate::devices_balloon::create(cfg.balloon, cfg.balloon_target_mib, &mem, &mut virtio)?;
    let (machine, latch) = assemble(
        cfg,
        &vm,
        &mem,
        &layout,
        HostSide {
            disks,
            serial_out,
            virtio,
            nets,
        },
        balloon,
    )?;
    machine.restore_legacy(&state.legacy)?;
    if state.virtio.len() != machine.pci.virtio.len() {
        return Err(VmmError::Devices(format!(
            "the snapshot has {} virtio devices, its configuration {}",
            state.virtio.len(),
            machine.pci.virtio.len()
        )));
    }
    for (i, (dev, saved)) in machine.pci.virtio.iter().zip(&state.virtio).enumerate() {
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(saved)
            .map_err(|e| VmmError::Devices(format!("virtio device {i}: {e}")))?;
        machine
            .pci
            .root
            .refresh(crate::pci::FIRST_DEVICE_SLOT + i as u8);
    }
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for saved in &state.vcpus {
        let vcpu = vm.create_vcpu(saved.id)?;
        vcpu.restore_state(saved)?;
        vcpus.push(vcpu);
    }
    // After the vCPUs' TSCs: kvmclock continues from the saved value.
    vm.restore_state(&state.vm)?;
    // After KVM's interrupt state is in place: see VirtioPciDevice::signal_all_queues.
    for dev in &machine.pci.virtio {
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .signal_all_queues();
    }
    Ok(BuiltVm {
        vcpus,
        machine,
        latch,
        vm,
        memory: mem,
        hypervisor,
    })
}

/// Builds the VM `cfg` describes.
pub fn build(cfg: &VmConfig, opts: BuildOptions) -> Result<BuiltVm, VmmError> {
    cfg.validate()?;
    if cfg.cmdline.len() >= CMDLINE_MAX_SIZE || cfg.cmdline.contains('\0') {
        return Err(VmmError::Cmdline(format!(
            "it must be shorter than {CMDLINE_MAX_SIZE} bytes and contain no NUL"
        )));
    }
    // Check the files before touching KVM, so bad input fails the same way everywhere.
    for (what, path) in [
        ("kernel", Some(&cfg.kernel)),
        ("initrd", cfg.initrd.as_ref()),
    ] {
        if let Some(p) = path {
            std::fs::File::open(p).map_err(|source| VmmError::ReadFile {
                what,
                path: p.clone(),
                source,
            })?;
        }
    }
    let HostSide {
        disks,
        serial_out,
        mut virtio,
        nets,
    } = host_side(cfg)?;

    let hypervisor = Hypervisor::new()?;
    let vm = Arc::new(hypervisor.create_vm()?);
    // Memory slots first: on some KVMs (PVM measured: 5-7 ms against 0.15 ms) the first slot
    // added after the in-kernel irqchip waits for a grace period that nothing else needs.
    let (mem, layout) = memory::create(&vm, cfg.memory_mib, cfg.wants_huge_pages())?;
    vm.setup_platform()?;
    let balloon =
        crate::devices_balloon::create(cfg.balloon, cfg.balloon_target_mib, &mem, &mut virtio)?;

    let kernel = kernel::load_kernel(&mem, &cfg.kernel, opts.protocol)?;
    if let Some(h) = kernel.header {
        if cfg.cmdline.len() >= h.cmdline_size as usize && h.cmdline_size != 0 {
            return Err(VmmError::Cmdline(format!(
                "the kernel accepts at most {} bytes",
                { h.cmdline_size }
            )));
        }
    }
    let mut cmdline = cfg.cmdline.clone().into_bytes();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))
        .map_err(|e| VmmError::Cmdline(e.to_string()))?;

    let initrd = match &cfg.initrd {
        Some(path) => {
            let mut ceiling = layout.low_end();
            if let Some(h) = kernel.header {
                ceiling = ceiling.min(u64::from(h.initrd_addr_max) + 1);
            }
            Some(kernel::load_initrd(&mem, path, kernel.end, ceiling)?)
        }
        None => None,
    };

    let rsdp = write_acpi_tables(
        &mem,
        &AcpiConfig {
            num_cpus: cfg.cpus as u8,
            oem_id: *b"FERRO ",
            pci: Some(PciAcpi::standard(layout.high)),
        },
    )
    .map_err(|e| VmmError::Acpi(e.to_string()))?;
    let map = layout.memory_map();
    regs::write_gdt(&mem)?;
    let entry = match kernel.entry {
        KernelEntry::Pvh(entry) => {
            let info = write_pvh_start_info(&mem, GuestAddress(CMDLINE_START), rsdp, initrd, &map)?;
            Entry::Pvh {
                entry,
                start_info: info.0,
            }
        }
        KernelEntry::Linux64(entry) => {
            regs::write_page_tables(&mem)?;
            let zp = write_linux_boot_params(
                &mem,
                &LinuxBoot {
                    header: kernel.header,
                    cmdline: (GuestAddress(CMDLINE_START), cfg.cmdline.len()),
                    initrd,
                    map: &map,
                    rsdp,
                },
            )?;
            Entry::Linux64 {
                entry,
                zero_page: zp.0,
            }
        }
    };

    let (machine, latch) = assemble(
        cfg,
        &vm,
        &mem,
        &layout,
        HostSide {
            disks,
            serial_out,
            virtio,
            nets,
        },
        balloon,
    )?;
    let vcpus = create_vcpus(&hypervisor, &vm, cfg.cpus, entry)?;
    Ok(BuiltVm {
        vcpus,
        machine,
        latch,
        vm,
        memory: mem,
        hypervisor,
    })
}

/// The machine (legacy devices, PCI with the virtio devices) on `vm`, with the host side's
/// NICs and the balloon handle recorded, and the exit latch its devices pull.
fn assemble(
    cfg: &VmConfig,
    vm: &Arc<Vm>,
    mem: &GuestMemory,
    layout: &RamLayout,
    host: HostSide,
    balloon: Option<ferro_virtio::balloon::BalloonHandle>,
) -> Result<(Machine, Arc<ExitLatch>), VmmError> {
    let latch = Arc::new(ExitLatch::new()?);
    let mut machine = machine::build(
        vm,
        mem,
        layout,
        latch.clone(),
        host.serial_out,
        PciDevices {
            rng: cfg.rng,
            disks: host.disks,
            virtio: host.virtio,
        },
    )?;
    machine.nets = host.nets;
    machine.balloon = balloon;
    Ok((machine, latch))
}

fn create_vcpus(hv: &Hypervisor, vm: &Vm, count: u32, entry: Entry) -> Result<Vec<Vcpu>, VmmError> {
    let supported = hv.supported_cpuid()?;
    let msrs = regs::boot_msrs();
    let mut vcpus = Vec::with_capacity(count as usize);
    for id in 0..count {
        let vcpu = vm.create_vcpu(id)?;
        let mut cpuid = supported.clone();
        configure_cpuid(
            &mut cpuid,
            &CpuidConfig {
                cpu_index: id,
                cpu_count: count,
                backend: backend(hv.kind()),
                tsc_khz: vcpu.tsc_khz(),
            },
        )
        .map_err(|e| VmmError::Cpuid(e.to_string()))?;
        vcpu.set_cpuid(&cpuid)?;
        vcpu.set_msrs(&msrs)?;
        let mut lapic = vcpu.lapic()?;
        regs::setup_lint(&mut lapic);
        vcpu.set_lapic(&lapic)?;
        if id == 0 {
            // Application processors wait for INIT/SIPI from the guest; only the BSP is set up.
            let mut sregs = vcpu.sregs()?;
            regs::setup_sregs(&mut sregs, entry);
            vcpu.set_sregs(&sregs)?;
            vcpu.set_regs(&regs::entry_regs(entry))?;
            vcpu.set_fpu(&regs::boot_fpu())?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}
