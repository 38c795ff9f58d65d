//! `guestkey-recover`: recovery of one volume from its escrow packet alone,
//! with no management server and no guestkeyd (the off-line mode of the
//! Fedora escrow plan). Needs a custodian's age identity file. Prints
//! nothing secret unless asked to (`show --reveal`).

#![allow(clippy::print_stderr)] // a command-line program reports errors on stderr

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use host_daemon::escrow::{Packet, passphrase_line};
use host_daemon::image::fs::SafeDir;
use host_daemon::image::luks1::recovery::{self, Expected};
use host_daemon::image::{ImageError, copy_cleartext};
use host_daemon::model::Format;
use secrecy::ExposeSecret;

/// Recover a guestkey volume from its escrow packet, offline.
#[derive(Parser)]
#[command(name = "guestkey-recover", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The packet and the identity that opens it.
#[derive(clap::Args)]
struct Opened {
    /// The escrow packet (`guestkeyctl escrow fetch` wrote it).
    #[arg(value_name = "PACKET")]
    packet: PathBuf,
    /// An age identity file of one of the packet's recipients
    /// (`age-keygen` writes one: AGE-SECRET-KEY-1...).
    #[arg(long, value_name = "FILE")]
    identity: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Show what the packet says of its volume (nothing secret unless
    /// --reveal).
    Show {
        #[command(flatten)]
        opened: Opened,
        /// Also print this secret of the packet.
        #[arg(long, value_enum)]
        reveal: Option<Secret>,
    },
    /// Add a passphrase of your own to the volume's LUKS header, unlocked
    /// with the packet's data key (e.g. to open the image with cryptsetup or
    /// qemu-img). Stop any guest using it first.
    AddPassphrase {
        #[command(flatten)]
        opened: Opened,
        /// The volume's image.
        #[arg(long, value_name = "PATH")]
        image: String,
        /// A file whose first line is the new passphrase (`-`: standard
        /// input).
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: PathBuf,
    },
    /// Rebuild a damaged LUKS header from the packet's data key: keyslot 0
    /// opens with the packet's passphrase again (the volume's guestkey
    /// key). The damaged bytes are saved first. Stop any guest using it.
    RestoreHeader {
        #[command(flatten)]
        opened: Opened,
        /// The volume's image.
        #[arg(long, value_name = "PATH")]
        image: String,
        /// Where the damaged header's bytes go (a new file; default: the
        /// image's path with `.damaged-header` appended).
        #[arg(long, value_name = "FILE")]
        save_old: Option<String>,
        /// The image is the packet's volume under another file name (the
        /// name is all that tells two volumes of one size apart once their
        /// headers are gone).
        #[arg(long)]
        renamed: bool,
    },
    /// Copy the volume's data, read-only, into a new cleartext image
    /// (qemu-img convert, checked with qemu-img compare).
    Copy {
        #[command(flatten)]
        opened: Opened,
        /// The volume's image.
        #[arg(long, value_name = "PATH")]
        image: String,
        /// The new cleartext image (must not exist).
        #[arg(long, value_name = "FILE")]
        out: String,
        /// Its format.
        #[arg(long, value_enum, default_value = "raw")]
        out_format: OutFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Secret {
    /// The volume's passphrase (its libvirt secret's value).
    Passphrase,
    /// The LUKS data key, in hex.
    DataKey,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutFormat {
    Raw,
    Qcow2,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guestkey-recover: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_small(path: &Path, what: &str, max: u64) -> Result<Vec<u8>, String> {
    let f = std::fs::File::open(path)
        .map_err(|e| format!("cannot open {what} {}: {e}", path.display()))?;
    let mut out = vec![];
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if out.len() as u64 > max {
        return Err(format!("{what} {} is over {max} bytes", path.display()));
    }
    Ok(out)
}

fn open_packet(o: &Opened) -> Result<Packet, String> {
    let raw = read_small(&o.packet, "packet", host_daemon::escrow::MAX_PACKET as u64)?;
    let id = zeroize::Zeroizing::new(read_small(&o.identity, "identity file", 64 << 10)?);
    let identities = age::IdentityFile::from_buffer(id.as_slice())
        .and_then(|f| f.into_identities().map_err(std::io::Error::other))
        .map_err(|e| format!("{} is not an age identity file: {e}", o.identity.display()))?;
    if identities.is_empty() {
        return Err(format!("{} holds no age identity", o.identity.display()));
    }
    Packet::open(&raw, &identities).map_err(|e| format!("{}: {}", o.packet.display(), e.0))
}

fn format_of(p: &Packet) -> Format {
    if p.meta.format == "raw" {
        Format::Raw
    } else {
        Format::Qcow2
    }
}

fn image_err(e: ImageError) -> String {
    e.to_string()
}

/// Opens the image for writing and locks it, refusing it while a QEMU
/// holds it (QEMU keeps byte-range locks on the images it has open).
fn open_for_write(image: &str) -> Result<std::fs::File, String> {
    let (dir, name) = SafeDir::of_file(image).map_err(|e| e.to_string())?;
    let f = dir.open_file(&name, true).map_err(|e| e.to_string())?;
    if locked(&f) {
        return Err(format!(
            "{image} is in use (a QEMU holds a lock on it): stop the guest first"
        ));
    }
    Ok(f)
}

/// Takes a lock on the whole file (a POSIX record lock, which conflicts
/// with QEMU's own byte-range locks): held until the file is closed, so no
/// QEMU opens the image while it is written. `true`: someone holds a lock.
fn locked(f: &std::fs::File) -> bool {
    rustix::fs::fcntl_lock(f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
}

/// A new file (mode 0600, never an existing one or a link), with its
/// directory and name to remove it again.
fn new_file(path: &str) -> Result<(std::fs::File, SafeDir, String), String> {
    let (dir, name) = SafeDir::of_file(path).map_err(|e| e.to_string())?;
    let f = dir
        .create_new(&name, 0o600)
        .map_err(|e| format!("{e} (give a file that does not exist yet)"))?;
    Ok((f, dir, name))
}

/// Whether `image` has the file name of the packet's volume.
fn same_name(p: &Packet, image: &str) -> bool {
    let name = |path: &str| {
        Path::new(path)
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default()
    };
    name(image) == name(&p.meta.path)
}

/// A note when `image` is not named like the packet's volume.
fn note_name(p: &Packet, image: &str) {
    if !same_name(p, image) {
        eprintln!(
            "note: the packet was made for {} on host {}; {image} has another name",
            p.meta.path, p.meta.host
        );
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Show { opened, reveal } => {
            let p = open_packet(&opened)?;
            let m = &p.meta;
            for (k, v) in [
                ("packet", m.packet_id.as_str()),
                ("volume", m.volume_name.as_str()),
                ("volume id", m.volume_id.as_str()),
                ("host", m.host.as_str()),
                ("path", m.path.as_str()),
                ("format", m.format.as_str()),
                ("created", m.created.as_str()),
                ("requested by", m.requested_by.as_str()),
                ("approved by", m.approved_by.as_str()),
                ("LUKS UUID", m.luks_uuid.as_str()),
            ] {
                println!("{k:<14}{v}");
            }
            println!("{:<14}{}", "generation", m.generation);
            println!("{:<14}{} bytes", "size", m.virtual_size);
            println!(
                "{:<14}passphrase and LUKS data key (not shown; --reveal)",
                "holds"
            );
            match reveal {
                None => {}
                Some(Secret::Passphrase) => {
                    println!("{:<14}{}", "passphrase", p.passphrase.expose_secret())
                }
                Some(Secret::DataKey) => {
                    let h = zeroize::Zeroizing::new(hex::encode(p.data_key.as_slice()));
                    println!("{:<14}{}", "data key", h.as_str());
                }
            }
            Ok(())
        }
        Command::AddPassphrase {
            opened,
            image,
            new_passphrase_file,
        } => {
            let p = open_packet(&opened)?;
            let raw = if new_passphrase_file == Path::new("-") {
                let mut b = zeroize::Zeroizing::new(vec![]);
                std::io::stdin()
                    .take(4097)
                    .read_to_end(&mut b)
                    .map_err(|e| format!("cannot read the new passphrase: {e}"))?;
                b
            } else {
                zeroize::Zeroizing::new(read_small(&new_passphrase_file, "passphrase file", 4096)?)
            };
            let new = passphrase_line(&raw).map_err(|e| e.0)?;
            note_name(&p, &image);
            let f = open_for_write(&image)?;
            recovery::add_passphrase_with_key(&f, format_of(&p), &p.data_key, &new, &image)
                .map_err(image_err)?;
            println!("added a keyslot for the new passphrase to {image}");
            Ok(())
        }
        Command::RestoreHeader {
            opened,
            image,
            save_old,
            renamed,
        } => {
            let p = open_packet(&opened)?;
            if !same_name(&p, &image) && !renamed {
                return Err(format!(
                    "the packet was made for {} on host {}, and {image} has another name: if it is that volume renamed, add --renamed",
                    p.meta.path, p.meta.host
                ));
            }
            let f = open_for_write(&image)?;
            let save_to = save_old.unwrap_or_else(|| format!("{image}.damaged-header"));
            let expected = Expected {
                uuid: &p.meta.luks_uuid,
                payload_sectors: p.meta.payload_sectors,
                region_offset: p.meta.luks_offset,
                virtual_size: p.meta.virtual_size,
            };
            let passphrase = p.passphrase.expose_secret().as_bytes();
            let written = recovery::restore_header(
                &f,
                format_of(&p),
                &expected,
                &p.data_key,
                passphrase,
                &image,
                |old| {
                    use std::io::Write;
                    let (mut out, dir, _) = new_file(&save_to).map_err(ImageError::Unsuitable)?;
                    out.write_all(old)
                        .and_then(|()| out.sync_all())
                        .map_err(|e| {
                            ImageError::Unsuitable(format!(
                                "cannot save the damaged header to {save_to}: {e}"
                            ))
                        })?;
                    // Its name too, before the header is rewritten.
                    dir.sync().map_err(|e| {
                        ImageError::Unsuitable(format!(
                            "cannot save the damaged header to {save_to}: {e}"
                        ))
                    })
                },
            )
            .map_err(image_err)?;
            println!(
                "rebuilt the LUKS header of {image} ({written} bytes; the damaged ones are in {save_to}): the volume's key opens it again"
            );
            Ok(())
        }
        Command::Copy {
            opened,
            image,
            out,
            out_format,
        } => {
            let p = open_packet(&opened)?;
            note_name(&p, &image);
            let (dir, name) = SafeDir::of_file(&image).map_err(|e| e.to_string())?;
            let src = dir.open_file(&name, false).map_err(|e| e.to_string())?;
            let (dst, out_dir, out_name) = new_file(&out)?;
            let to = match out_format {
                OutFormat::Raw => Format::Raw,
                OutFormat::Qcow2 => Format::Qcow2,
            };
            let passphrase = p.passphrase.expose_secret().as_bytes();
            if let Err(e) = copy_cleartext(&src, format_of(&p), passphrase, &dst, to, &image) {
                drop(dst);
                if let Err(r) = out_dir.remove(&out_name) {
                    eprintln!("guestkey-recover: cannot remove the unfinished {out}: {r}");
                }
                return Err(image_err(e));
            }
            println!(
                "copied the data of {image} into {out} (cleartext {}; checked with qemu-img compare)",
                to.as_str()
            );
            Ok(())
        }
    }
}
