//! The PCI side of the machine: the root bus with its host bridge, the virtio devices on it,
//! and the KVM plumbing they need — MSI routes and irqfds for MSI-X vectors, ioeventfds for
//! queue notifications — plus the handlers that put ECAM and the BAR windows on the MMIO bus
//! and CONFIG_ADDRESS/CONFIG_DATA on the port bus.
//!
//! Interrupts: every MSI-X vector of every device owns a GSI (from 24 up) with an irqfd
//! registered once. When the guest programs and unmasks a vector, its GSI gets an MSI route;
//! the routing table KVM gets is always KVM's default irqchip routes (GSI 0..24) plus every
//! MSI route in use, because KVM_SET_GSI_ROUTING replaces the whole table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ferro_arch::layout::{self, ports};
use ferro_devices::PioBus;
use ferro_hypervisor::{default_irqchip_routes, IrqRoute, Vm, IRQCHIP_GSIS};
use ferro_pci::{
    BarAllocator, MsiMessage, MsiRouting, PciConfigAddress, PciConfigData, PciRoot, PciWindow,
};
use ferro_virtio::{rng::Rng, NotifyRegistry, VirtioDevice, VirtioPciDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::memory::GuestMemory;
use crate::mmio::{MmioBus, MmioDevice};
use crate::VmmError;

/// Most GSIs KVM routes (KVM_CAP_IRQ_ROUTING reports 4096 on our hosts; x86's KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;
/// First slot for devices (slot 0 is the host bridge).
pub(crate) const FIRST_DEVICE_SLOT: u8 = 1;

fn dev_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Devices(e.to_string())
}

/// The VM's GSI routing table: the default irqchip routes plus the MSI routes in use.
pub struct GsiRoutes {
    vm: Arc<Vm>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    next: AtomicU32,
}

impl GsiRoutes {
    /// An empty set of MSI routes for `vm`.
    pub fn new(vm: Arc<Vm>) -> Self {
        Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
            next: AtomicU32::new(IRQCHIP_GSIS),
        }
    }

    /// Reserves `n` consecutive GSIs for MSI routes.
    fn allocate(&self, n: u32) -> Result<Vec<u32>, VmmError> {
        let first = self.next.fetch_add(n, Ordering::Relaxed);
        if first.saturating_add(n) > MAX_GSI {
            return Err(VmmError::Devices(format!(
                "out of GSIs for {n} MSI-X vectors"
            )));
        }
        Ok((first..first + n).collect())
    }

    /// Points `gsi` at `msg` (or removes its route) and hands KVM the new table.
    fn set(&self, gsi: u32, msg: Option<MsiMessage>) {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        match msg {
            Some(m) => msi.insert(gsi, m),
            None => msi.remove(&gsi),
        };
        let mut routes = default_irqchip_routes();
        routes.extend(msi.iter().map(|(&gsi, m)| IrqRoute::Msi {
            gsi,
            address: m.address,
            data: m.data,
        }));
        if let Err(e) = self.vm.set_gsi_routing(&routes) {
            // The guest loses this vector's interrupts; the VM itself keeps running.
            eprintln!("ferro-vmm: MSI route for GSI {gsi}: {e}");
        }
    }
}

/// MSI-X delivery of one device: a GSI and an irqfd per vector.
struct KvmMsi {
    routes: Arc<GsiRoutes>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
}

impl KvmMsi {
    fn new(vm: &Vm, routes: Arc<GsiRoutes>, vectors: u32) -> Result<Self, VmmError> {
        let gsis = routes.allocate(vectors)?;
        let mut irqfds = Vec::with_capacity(gsis.len());
        for &gsi in &gsis {
            let fd = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
            vm.register_irqfd(&fd, gsi)?;
            irqfds.push(fd);
        }
        Ok(Self {
            routes,
            gsis,
            irqfds,
        })
    }
}

impl MsiRouting for KvmMsi {
    fn route(&self, vector: u16, msg: Option<MsiMessage>) {
        if let Some(&gsi) = self.gsis.get(usize::from(vector)) {
            self.routes.set(gsi, msg);
        }
    }

    fn signal(&self, vector: u16) {
        if let Some(fd) = self.irqfds.get(usize::from(vector)) {
            // Fails only if the counter would overflow, when the interrupt is pending anyway.
            let _ = fd.write(1);
        }
    }
}

/// Queue notification addresses as KVM ioeventfds.
struct KvmNotify(Arc<Vm>);

impl NotifyRegistry for KvmNotify {
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .register_mmio_ioeventfd(fd, addr)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn unregister(&self, addr: u64, fd: &EventFd) {
        let _ = self.0.unregister_mmio_ioeventfd(fd, addr);
    }
}

/// ECAM on the MMIO bus.
struct Ecam(Arc<PciRoot>);

impl MmioDevice for Ecam {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        self.0.ecam_read(offset, data);
        true
    }
    fn write(&self, offset: u64, data: &[u8]) -> bool {
        self.0.ecam_write(offset, data);
        true
    }
}

/// A host bridge memory window on the MMIO bus: accesses go to the BAR decoding them.
struct BarWindow {
    base: u64,
    root: Arc<PciRoot>,
}

impl MmioDevice for BarWindow {
    fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        self.root.bar_read(self.base + offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) -> bool {
        self.root.bar_write(self.base + offset, data)
    }
}

/// A virtio device on the bus.
pub type SharedVirtio = Arc<Mutex<VirtioPciDevice>>;

/// The PCI part of the machine.
pub struct PciMachine {
    /// The root bus.
    pub root: Arc<PciRoot>,
    /// The virtio devices, in slot order.
    pub virtio: Vec<SharedVirtio>,
}

/// What goes on the PCI bus.
pub struct PciDevices {
    /// A virtio-rng device.
    pub rng: bool,
    /// virtio-blk disks, opened ([`crate::devices_block::open_disks`]).
    pub disks: Vec<ferro_virtio::block::BlockConfig>,
    /// More virtio devices (built by the `devices_*` modules), in slot order after the disks.
    pub virtio: Vec<Box<dyn VirtioDevice>>,
}

/// Builds the root bus and its devices and puts their access paths on the buses.
pub fn build(
    vm: &Arc<Vm>,
    mem: &GuestMemory,
    high_ram: u64,
    devices: PciDevices,
    pio: &mut PioBus,
    mmio: &mut MmioBus,
) -> Result<PciMachine, VmmError> {
    let w32 = PciWindow {
        start: layout::PCI_MMIO32_START,
        size: layout::PCI_MMIO32_SIZE,
    };
    let (s64, l64) = layout::pci_mmio64_window(high_ram);
    let w64 = PciWindow {
        start: s64,
        size: l64,
    };
    let mut alloc = BarAllocator::new(w32, Some(w64)).map_err(dev_err)?;
    let mut root = PciRoot::new(vec![w32, w64]);
    let routes = Arc::new(GsiRoutes::new(vm.clone()));
    let notify: Arc<dyn NotifyRegistry> = Arc::new(KvmNotify(vm.clone()));

    let mut wanted: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if devices.rng {
        wanted.push(Box::new(Rng::new()));
    }
    wanted.extend(crate::devices_block::devices(&devices.disks));
    wanted.extend(devices.virtio);
    let mut virtio = Vec::new();
    for (i, dev) in wanted.into_iter().enumerate() {
        let vectors = dev.queue_max_sizes().len() as u32 + 1;
        let msi = Arc::new(KvmMsi::new(vm, routes.clone(), vectors)?);
        let t = VirtioPciDevice::new(dev, mem.clone(), msi, notify.clone()).map_err(dev_err)?;
        let t = Arc::new(Mutex::new(t));
        let slot = FIRST_DEVICE_SLOT + i as u8;
        root.add_device(slot, t.clone(), &mut alloc)
            .map_err(dev_err)?;
        virtio.push(t);
    }

    let root = Arc::new(root);
    pio.insert(
        ports::PCI_CONFIG_ADDRESS,
        1,
        Arc::new(Mutex::new(PciConfigAddress(root.clone()))),
    )
    .map_err(dev_err)?;
    pio.insert(
        ports::PCI_CONFIG_DATA,
        4,
        Arc::new(Mutex::new(PciConfigData(root.clone()))),
    )
    .map_err(dev_err)?;
    mmio.insert(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        Arc::new(Ecam(root.clone())),
    )
    .map_err(dev_err)?;
    for w in [w32, w64] {
        let win = BarWindow {
            base: w.start,
            root: root.clone(),
        };
        mmio.insert(w.start, w.size, Arc::new(win))
            .map_err(dev_err)?;
    }
    Ok(PciMachine { root, virtio })
}
