//! The legacy PC around the CPUs: COM1, i8042 (reset only), CMOS/RTC, ACPI power management,
//! the 0xcf9 reset port, pvpanic and a sink for POST codes, all on one port I/O bus; the PCI
//! root bus with its virtio devices ([`crate::pci`]) on the MMIO bus and the 0xcf8/0xcfc ports;
//! and the latch through which a guest request (power-off, reset, panic) or a vCPU failure ends
//! the VM.

use std::io::Write;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use ferro_arch::layout::ports;
use ferro_arch::memory_map::RamLayout;
use ferro_devices::{
    AcpiPmDevice, AcpiPmState, CmosDevice, CmosState, GuestRequest, GuestRequestSink, I8042Device,
    PioBus, PioDevice, PvPanicDevice, ResetDevice, ResetState, SerialDevice, SerialDeviceState,
    SinkDevice,
};
use ferro_hypervisor::Vm;
use serde::{Deserialize, Serialize};

use crate::memory::GuestMemory;
use crate::mmio::MmioBus;
use crate::pci::{PciDevices, PciMachine};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{ExitStatus, VmmError};

/// Records the first reason the VM must end and wakes the event loop.
pub struct ExitLatch {
    status: AtomicI32,
    event: EventFd,
}

const NO_EXIT: i32 = -1;

impl ExitLatch {
    /// A latch nobody has pulled yet.
    pub fn new() -> Result<Self, VmmError> {
        Ok(Self {
            status: AtomicI32::new(NO_EXIT),
            event: EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?,
        })
    }

    /// Asks for the VM to end with `status`; the first request wins.
    pub fn request(&self, status: ExitStatus) {
        if self
            .status
            .compare_exchange(NO_EXIT, status as i32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // A failed write means the counter is saturated: the loop is woken already.
            let _ = self.event.write(1);
        }
    }

    /// The status asked for, if any.
    pub fn status(&self) -> Option<ExitStatus> {
        match self.status.load(Ordering::Acquire) {
            0 => Some(ExitStatus::Ok),
            2 => Some(ExitStatus::TripleFault),
            3 => Some(ExitStatus::GuestPanic),
            4 => Some(ExitStatus::KvmFailure),
            130 => Some(ExitStatus::Interrupted),
            143 => Some(ExitStatus::Terminated),
            NO_EXIT => None,
            _ => Some(ExitStatus::Error),
        }
    }

    /// Whether the VM is ending.
    pub fn is_set(&self) -> bool {
        self.status.load(Ordering::Relaxed) != NO_EXIT
    }

    /// The event the loop waits on.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

impl GuestRequestSink for ExitLatch {
    fn guest_request(&self, req: GuestRequest) {
        self.request(match req {
            GuestRequest::PowerOff | GuestRequest::Reset => ExitStatus::Ok,
            GuestRequest::Panic => ExitStatus::GuestPanic,
        });
    }
}

/// The buses the vCPUs dispatch exits to.
pub struct Buses {
    /// Port I/O.
    pub pio: PioBus,
    /// MMIO outside RAM: PCIe ECAM and the PCI BAR windows.
    pub mmio: MmioBus,
}

/// The devices of one VM.
pub struct Machine {
    /// The buses the vCPUs dispatch to.
    pub bus: Arc<Buses>,
    /// The PCI root bus and the virtio devices on it.
    pub pci: PciMachine,
    /// The device event loop thread, if any device has queues.
    pub events: Option<std::thread::JoinHandle<()>>,
    /// COM1, for console input.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// ACPI PM, for the power button.
    pub acpi_pm: Arc<Mutex<AcpiPmDevice>>,
    /// CMOS/RTC, for snapshots.
    pub cmos: Arc<Mutex<CmosDevice>>,
    /// The 0xcf9 reset register, for snapshots.
    pub reset: Arc<Mutex<ResetDevice>>,
    /// The NICs (tap names, MACs, counters), for status; the builder fills it in.
    pub nets: Vec<crate::devices_net::NetInfo>,
    /// The balloon's handle (target, statistics), when there is one; the builder fills it in.
    pub balloon: Option<ferro_virtio::balloon::BalloonHandle>,
}

/// Saved state of the legacy devices (i8042, pvpanic and the sink have none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyState {
    /// COM1: registers, FIFO, pending interrupt.
    pub serial: SerialDeviceState,
    /// CMOS RAM and the RTC's offset from the host clock.
    pub cmos: CmosState,
    /// ACPI PM1 registers and the PM timer.
    pub acpi_pm: AcpiPmState,
    /// The reset control register.
    pub reset: ResetState,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handles on the legacy devices that have state, to save it from another thread (a
/// migration).
#[derive(Clone)]
pub struct LegacyHandles {
    serial: Arc<Mutex<SerialDevice>>,
    cmos: Arc<Mutex<CmosDevice>>,
    acpi_pm: Arc<Mutex<AcpiPmDevice>>,
    reset: Arc<Mutex<ResetDevice>>,
}

impl LegacyHandles {
    /// The legacy devices' state (the vCPUs are paused).
    pub fn save(&self) -> LegacyState {
        LegacyState {
            serial: lock(&self.serial).save(),
            cmos: lock(&self.cmos).save(),
            acpi_pm: lock(&self.acpi_pm).save(),
            reset: lock(&self.reset).save(),
        }
    }
}

impl Machine {
    /// Handles on the legacy devices with state.
    pub fn legacy_handles(&self) -> LegacyHandles {
        LegacyHandles {
            serial: self.serial.clone(),
            cmos: self.cmos.clone(),
            acpi_pm: self.acpi_pm.clone(),
            reset: self.reset.clone(),
        }
    }

    /// The legacy devices' state (the vCPUs are paused).
    pub fn save_legacy(&self) -> LegacyState {
        self.legacy_handles().save()
    }

    /// Puts back [`Machine::save_legacy`]'s result.
    pub fn restore_legacy(&self, s: &LegacyState) -> Result<(), VmmError> {
        lock(&self.serial).restore(&s.serial).map_err(dev_err)?;
        lock(&self.cmos).restore(&s.cmos).map_err(dev_err)?;
        lock(&self.acpi_pm).restore(&s.acpi_pm).map_err(dev_err)?;
        lock(&self.reset).restore(&s.reset).map_err(dev_err)?;
        Ok(())
    }
}

fn dev_err(e: impl std::fmt::Display) -> VmmError {
    VmmError::Devices(e.to_string())
}

/// Creates the devices, wires their interrupts through irqfds, puts them on the buses and
/// starts the device event loop.
pub fn build(
    vm: &Arc<Vm>,
    mem: &GuestMemory,
    layout: &RamLayout,
    latch: Arc<ExitLatch>,
    serial_out: Box<dyn Write + Send>,
    devices: PciDevices,
) -> Result<Machine, VmmError> {
    let requests: Arc<dyn GuestRequestSink> = latch;
    let com1_irq = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
    vm.register_irqfd(&com1_irq, ports::COM1_IRQ)?;
    let sci = EventFd::new(EFD_NONBLOCK).map_err(VmmError::io("eventfd"))?;
    vm.register_irqfd(&sci, ports::SCI_IRQ)?;

    let serial = Arc::new(Mutex::new(SerialDevice::new(com1_irq, serial_out)));
    let acpi_pm = Arc::new(Mutex::new(AcpiPmDevice::new(sci, requests.clone())));
    let cmos = Arc::new(Mutex::new(CmosDevice::new(layout.low, layout.high)));
    let reset = Arc::new(Mutex::new(ResetDevice::new(requests.clone())));
    let sink = Arc::new(Mutex::new(SinkDevice::new()));

    let mut bus = PioBus::new();
    let mut add = |base: u16, len: u16, dev: Arc<Mutex<dyn PioDevice>>| {
        bus.insert(base, len, dev).map_err(dev_err)
    };
    add(ports::COM1, 8, serial.clone())?;
    add(ports::PM1A_EVT_BLK, ports::PM_BLK_LEN, acpi_pm.clone())?;
    add(
        ports::I8042_DATA,
        5,
        Arc::new(Mutex::new(I8042Device::new(requests.clone()))),
    )?;
    add(ports::CMOS_INDEX, 2, cmos.clone())?;
    add(ports::RESET_REG, 1, reset.clone())?;
    add(
        ports::PVPANIC,
        1,
        Arc::new(Mutex::new(PvPanicDevice::new(requests))),
    )?;
    // POST codes and probes of absent COM2..COM4 are swallowed cheaply.
    add(ports::POST, 1, sink.clone())?;
    for base in [0x2f8, 0x3e8, 0x2e8] {
        add(base, 8, sink.clone())?;
    }
    let mut mmio = MmioBus::new();
    let pci = crate::pci::build(vm, mem, layout.high, devices, &mut bus, &mut mmio)?;
    let events = crate::event_loop::start(&pci.virtio)?;
    Ok(Machine {
        bus: Arc::new(Buses { pio: bus, mmio }),
        pci,
        events,
        serial,
        acpi_pm,
        cmos,
        reset,
        nets: Vec::new(),
        balloon: None,
    })
}
