//! The stream's framing (QEMU's migration/savevm.c): the `QEVM` header,
//! the configuration record, commands, and the headers and footers of
//! sections, up to the end of the RAM section. This is where the parser
//! decides what it can skip (commands carry their length) and what it
//! must refuse (device state before the RAM is complete has none).

use super::Parser;
use crate::error::{ImageError, Result};

const QEMU_VM_FILE_MAGIC: &[u8] = b"QEVM";
const QEMU_VM_FILE_VERSION: u32 = 3;

// Section types (savevm.c).
const QEMU_VM_EOF: u8 = 0x00;
const QEMU_VM_SECTION_START: u8 = 0x01;
const QEMU_VM_SECTION_PART: u8 = 0x02;
const QEMU_VM_SECTION_END: u8 = 0x03;
const QEMU_VM_SECTION_FULL: u8 = 0x04;
const QEMU_VM_SUBSECTION: u8 = 0x05;
const QEMU_VM_CONFIGURATION: u8 = 0x07;
const QEMU_VM_COMMAND: u8 = 0x08;
const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// QEMU_VM_COMMAND sub-command (savevm.c `enum qemu_vm_cmd`).
const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
/// The RAM section's vmstate version since QEMU 2.x.
const RAM_SECTION_VERSION: u32 = 4;
/// Longest machine type name accepted (QEMU's are a few dozen bytes).
const MAX_MACHINE_NAME: u32 = 256;

impl Parser<'_> {
    /// Reads up to the end of the RAM section.
    pub(super) fn parse(&mut self) -> Result<()> {
        let start = self.r.pos;
        if self.r.bytes(4, "stream magic")? != QEMU_VM_FILE_MAGIC {
            corrupt!(self, start, "not a QEMU migration stream (no QEVM magic)");
        }
        let version = self.r.be32("stream version")?;
        if version != QEMU_VM_FILE_VERSION {
            unsupported!(
                self,
                start + 4,
                "QEMU migration stream version {version}; snaptree reads version 3 \
                (QEMU 0.13 and later)"
            );
        }
        let after_header = self.r.pos;
        loop {
            let at = self.r.pos;
            let Some(kind) = self.r.peek()? else {
                corrupt!(
                    self,
                    at,
                    "the stream ends before its RAM section is complete: the file is truncated"
                );
            };
            self.r.pos += 1;
            match kind {
                QEMU_VM_CONFIGURATION => self.configuration(at, at == after_header)?,
                QEMU_VM_COMMAND => self.command(at)?,
                QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => self.section_start(at, kind)?,
                QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                    let id = self.r.be32("section id")?;
                    if self.ram_section != Some(id) {
                        let ram = match self.ram_section {
                            Some(ram) => format!("RAM is section {ram}"),
                            None => "the RAM section has not started".to_string(),
                        };
                        corrupt!(self, at, "section id {id} never started ({ram})");
                    }
                    self.ram_part()?;
                    self.footer(id)?;
                    if kind == QEMU_VM_SECTION_END {
                        if !self.listed {
                            corrupt!(self, at, "the RAM section ended without a RAM block list");
                        }
                        // The rest is device state, which a memory view
                        // does not need.
                        return Ok(());
                    }
                }
                QEMU_VM_EOF => {
                    corrupt!(
                        self,
                        at,
                        "the stream ends (QEMU_VM_EOF) before its RAM section is complete"
                    );
                }
                other => {
                    corrupt!(
                        self,
                        at,
                        "unknown section type 0x{other:02x} before the RAM section is complete"
                    );
                }
            }
        }
    }

    /// A START or FULL section header at `at`: only the RAM section's
    /// START is read (its first part follows).
    fn section_start(&mut self, at: u64, kind: u8) -> Result<()> {
        let id = self.r.be32("section id")?;
        let name = self.r.str8("section name")?;
        let instance = self.r.be32("section instance id")?;
        let version = self.r.be32("section version id")?;
        if kind == QEMU_VM_SECTION_FULL {
            unsupported!(
                self,
                at,
                "device state section '{name}' (id {id}, instance {instance}) before \
                the RAM section is complete: device state carries no length, so \
                snaptree cannot skip it"
            );
        }
        if name != "ram" {
            unsupported!(
                self,
                at,
                "iterative section '{name}' (id {id}) interleaved with RAM: snaptree \
                cannot skip it without parsing it; migrate without the capability \
                that adds it"
            );
        }
        if self.ram_section.is_some() {
            corrupt!(self, at, "a second RAM section starts");
        }
        if version != RAM_SECTION_VERSION {
            unsupported!(
                self,
                at,
                "RAM section version {version} (snaptree reads version 4)"
            );
        }
        self.ram_section = Some(id);
        self.ram_part()?;
        self.footer(id)
    }

    /// QEMU_VM_CONFIGURATION at `at`: the machine type, then subsections.
    /// QEMU writes one, right after the stream header (`first`), and its
    /// loader accepts no other: a later one could change the page size
    /// under pages already indexed, and the capabilities under blocks
    /// already listed.
    fn configuration(&mut self, at: u64, first: bool) -> Result<()> {
        if !first {
            corrupt!(
                self,
                at,
                "a configuration record here: QEMU writes only one, right after the \
                stream header (a later one would change the page size and capabilities \
                of what is already indexed)"
            );
        }
        let len_at = self.r.pos;
        let len = self.r.be32("machine type length")?;
        if len > MAX_MACHINE_NAME {
            corrupt!(self, len_at, "machine type name of {len} bytes");
        }
        let name = self.r.bytes(len as usize, "machine type")?;
        self.machine = Some(String::from_utf8_lossy(&name).into_owned());
        while self.r.peek()? == Some(QEMU_VM_SUBSECTION) {
            let at = self.r.pos;
            self.r.pos += 1;
            let name = self.r.str8("configuration subsection name")?;
            self.r.be32("configuration subsection version")?;
            match name.as_str() {
                "configuration/target-page-bits" => {
                    let bits = self.r.be32("target page bits")?;
                    if !(9..=20).contains(&bits) {
                        corrupt!(self, at, "target page bits {bits}");
                    }
                    self.page_size = 1 << bits;
                }
                "configuration/capabilities" => {
                    // Each name is at least its length byte, so a huge
                    // count ends at the end of the file.
                    for _ in 0..self.r.be32("capability count")? {
                        match self.r.str8("capability name")?.as_str() {
                            "mapped-ram" => self.mapped_ram = true,
                            "x-ignore-shared" => self.ignore_shared = true,
                            _ => {}
                        }
                    }
                }
                "configuration/uuid" => self.r.skip(16, "VM UUID")?,
                _ => unsupported!(self, at, "unknown configuration subsection '{name}'"),
            }
        }
        Ok(())
    }

    /// QEMU_VM_COMMAND: be16 command, be16 length, arguments.
    fn command(&mut self, at: u64) -> Result<()> {
        let cmd = self.r.be16("command")?;
        let len = self.r.be16("command length")?;
        let refused = match cmd {
            4 | 5 => "postcopy (POSTCOPY_LISTEN/RUN): RAM completes after the device state",
            6 => "a postcopy page discard (POSTCOPY_RAM_DISCARD)",
            7 => "a packaged stream (PACKAGED, postcopy)",
            8 => "COLO (ENABLE_COLO)",
            9 => "a postcopy resume (POSTCOPY_RESUME)",
            _ => "",
        };
        if !refused.is_empty() {
            unsupported!(
                self,
                at,
                "stream command {cmd}: {refused}; snaptree reads pre-copy streams"
            );
        }
        if cmd == MIG_CMD_POSTCOPY_ADVISE && len >= 16 {
            // Postcopy RAM was enabled: block list entries of blocks on
            // huge pages carry their page size.
            self.postcopy_advised = true;
        }
        self.r.skip(u64::from(len), "command arguments")
    }

    /// The footer after a section part (machine types since 2.4 write
    /// one; then every part has one).
    fn footer(&mut self, id: u32) -> Result<()> {
        let at = self.r.pos;
        let present = self.r.peek()? == Some(QEMU_VM_SECTION_FOOTER);
        if !present && self.footers == Some(true) {
            corrupt!(self, at, "missing footer of section {id}");
        }
        self.footers = Some(present);
        if present {
            self.r.pos += 1;
            let got = self.r.be32("section footer")?;
            if got != id {
                corrupt!(self, at, "footer of section {got} ends section {id}");
            }
        }
        Ok(())
    }
}
