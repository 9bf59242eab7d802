//! The exit actions: ACPI power-off, reset, triple fault, pvpanic, halt.

use crate::acpi::Acpi;
use crate::cpu::{halt_forever, outb};
use core::arch::asm;

/// What to do once the report is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// ACPI S5.
    Poweroff,
    /// FADT reset register, else the i8042.
    Reboot,
    /// Empty IDT + `ud2`.
    Triplefault,
    /// pvpanic, then halt.
    Panic,
    /// `cli; hlt` forever.
    Halt,
}

impl Exit {
    /// Parses a `exit=` value.
    pub fn parse(v: &[u8]) -> Option<Exit> {
        Some(match v {
            b"poweroff" => Exit::Poweroff,
            b"reboot" => Exit::Reboot,
            b"triplefault" => Exit::Triplefault,
            b"panic" => Exit::Panic,
            b"halt" => Exit::Halt,
            _ => return None,
        })
    }

    /// The name printed in `probe=exit:`.
    pub fn name(self) -> &'static str {
        match self {
            Exit::Poweroff => "poweroff",
            Exit::Reboot => "reboot",
            Exit::Triplefault => "triplefault",
            Exit::Panic => "panic",
            Exit::Halt => "halt",
        }
    }
}

/// pvpanic I/O port.
const PVPANIC: u16 = 0x505;

/// Performs `exit`.
pub fn exit(exit: Exit, acpi: &Acpi) -> ! {
    match exit {
        Exit::Poweroff => poweroff(acpi),
        Exit::Reboot => {
            if let Some((reg, val)) = acpi.reset {
                reg.write(val as u64, 1);
            }
            outb(0x64, 0xfe);
        }
        Exit::Triplefault => triple_fault(),
        Exit::Panic => outb(PVPANIC, 1),
        Exit::Halt => {}
    }
    halt_forever()
}

fn poweroff(acpi: &Acpi) {
    let Some(s5) = acpi.s5 else { return };
    if acpi.hw_reduced() {
        if let Some(reg) = acpi.sleep_ctl {
            reg.write((((s5 & 7) as u64) << 2) | 0x20, 1);
            return;
        }
    }
    if let Some(reg) = acpi.pm1a_cnt {
        reg.write((((s5 & 7) as u64) << 10) | (1 << 13), 2);
    }
}

/// Reports a fatal condition through pvpanic and stops.
pub fn panic_stop() -> ! {
    outb(PVPANIC, 1);
    halt_forever()
}

/// Loads an empty IDT and raises #UD: #UD -> #DF -> shutdown.
pub fn triple_fault() -> ! {
    let idtr = [0u16; 5];
    // SAFETY: deliberately makes every exception undeliverable; this CPU never resumes.
    unsafe { asm!("lidt [{p}]", "ud2", p = in(reg) idtr.as_ptr(), options(noreturn, nostack)) }
}
