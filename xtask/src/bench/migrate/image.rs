//! The Multiboot kernel QEMU boots: `guest.S`, assembled with binutils'
//! `as` and linked to a flat image by `ld` (both from the machine, nothing
//! downloaded). The source is in the xtask binary, so the image always
//! matches the offsets below.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The assembly source: see its header comment for what the guest does.
const SOURCE: &str = include_str!("guest.S");

/// Where the image is linked and loaded (`LOAD` in `guest.S`).
pub const LOAD: u64 = 0x10000;
/// Guest-physical address of the completed-pass counter.
pub const PASS_COUNT: u64 = LOAD + 0x40;
/// Guest-physical address of the region table: (start, end) pairs of
/// 64-bit words, ended by an end of 0.
pub const REGIONS: u64 = LOAD + 0x50;
/// Entries in the region table, the terminating one included.
pub const REGION_SLOTS: usize = 33;

/// The two guests: the increment loop, or the same setup then `hlt`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Increments a byte in every page above 1 MiB, forever (at CPL 3).
    Increment,
    /// Sets up, then halts with interrupts off: nothing writes.
    Idle,
}

/// Assembles and links the `variant` image into `dir`, returning its path.
pub fn build(dir: &Path, variant: Variant) -> Result<PathBuf, String> {
    let source = dir.join("guest.S");
    std::fs::write(&source, SOURCE)
        .map_err(|e| format!("cannot write {}: {e}", source.display()))?;
    let name = match variant {
        Variant::Increment => "increment",
        Variant::Idle => "idle",
    };
    let object = dir.join(format!("guest-{name}.o"));
    let image = dir.join(format!("guest-{name}.bin"));
    let mut assemble = Command::new("as");
    assemble.arg("--64");
    if variant == Variant::Idle {
        assemble.args(["--defsym", "IDLE=1"]);
    }
    assemble.arg("-o").arg(&object).arg(&source);
    run(assemble)?;
    let mut link = Command::new("ld");
    link.args(["-m", "elf_x86_64", "--oformat", "binary", "-e", "0"])
        .arg(format!("-Ttext={LOAD:#x}"))
        .arg("-o")
        .arg(&image)
        .arg(&object);
    run(link)?;
    check(&image)?;
    Ok(image)
}

fn run(mut command: Command) -> Result<(), String> {
    let shown = format!("{command:?}");
    let out = command
        .output()
        .map_err(|e| format!("cannot run {shown}: {e} (install binutils)"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The Multiboot header QEMU looks for: magic, flags, checksum and the
/// a.out-kludge addresses at the start of the image.
fn check(image: &Path) -> Result<(), String> {
    let bytes =
        std::fs::read(image).map_err(|e| format!("cannot read {}: {e}", image.display()))?;
    let word = |i: usize| {
        bytes
            .get(i * 4..i * 4 + 4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .unwrap_or(0)
    };
    let (magic, flags, checksum) = (word(0), word(1), word(2));
    let sum = magic.wrapping_add(flags).wrapping_add(checksum);
    if magic != 0x1BAD_B002 || sum != 0 || u64::from(word(4)) != LOAD {
        return Err(format!(
            "{} has no valid Multiboot header (magic {magic:#x}, checksum sum {sum:#x}, load {:#x})",
            image.display(),
            word(4)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both images assemble, carry a valid header, and differ only where
    /// the idle guest halts instead of dropping to CPL 3. Needs binutils,
    /// which every machine that builds Rust with gcc has.
    #[test]
    fn both_images_assemble_with_a_multiboot_header() {
        if Command::new("as").arg("--version").output().is_err() {
            println!("skipped: no `as` (binutils) on this machine");
            return;
        }
        let dir = std::env::temp_dir().join(format!("xtask-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let inc = std::fs::read(build(&dir, Variant::Increment).unwrap()).unwrap();
        let idle = std::fs::read(build(&dir, Variant::Idle).unwrap()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // The header's entry address points past the tables into the image.
        let entry = u32::from_le_bytes(inc[28..32].try_into().unwrap()) as u64;
        assert!(entry >= REGIONS + REGION_SLOTS as u64 * 16 && entry < LOAD + inc.len() as u64);
        // Counter and region table start zeroed; the guest fills them.
        let table = (PASS_COUNT - LOAD) as usize..(REGIONS - LOAD) as usize + REGION_SLOTS * 16;
        assert!(inc[table.clone()].iter().all(|&b| b == 0));
        assert!(idle[table].iter().all(|&b| b == 0));
        // `sysexitq` (48 0f 35) only in the increment guest, `hlt` only in idle.
        let has = |img: &[u8], pat: &[u8]| img.windows(pat.len()).any(|w| w == pat);
        assert!(has(&inc, &[0x48, 0x0f, 0x35]) && !has(&idle, &[0x48, 0x0f, 0x35]));
        // The identity map's last 2 MiB entry: 16 GiB - 2 MiB, user, writable, large.
        let last = u64::from_le_bytes(inc[inc.len() - 8..].try_into().unwrap());
        assert_eq!(last, ((16u64 << 30) - (2 << 20)) | 0x87);
    }
}
