//! Shell completions and man pages generated from a clap command, for
//! packagers (`scripts/package.sh`). Shared by the `toa-shim` and `toa-lb`
//! binaries: each includes this file (`#[path]`), as they live in crates that
//! share no dependency that could hold it.

use std::path::{Path, PathBuf};

use clap::Subcommand;

/// `completions SHELL` and `manpages DIR`.
#[derive(Subcommand)]
pub(crate) enum Assets {
    /// Print the completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (section 1) into DIR.
    Manpages {
        /// The directory.
        dir: PathBuf,
    },
}

/// Does what `what` asks for the binary `name` whose command line is `command`.
pub(crate) fn run(mut command: clap::Command, name: &str, what: Assets) -> Result<(), String> {
    match what {
        Assets::Completions { shell } => {
            clap_complete::generate(shell, &mut command, name, &mut std::io::stdout());
            Ok(())
        }
        Assets::Manpages { dir } => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            command.build();
            write_pages(&command, name, &dir)
        }
    }
}

/// Writes NAME.1 for `command`, then NAME-SUB.1 for each (visible) subcommand, down the tree.
fn write_pages(command: &clap::Command, name: &str, dir: &Path) -> Result<(), String> {
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone().name(name.to_owned()))
        .render(&mut page)
        .map_err(|e| format!("render {name}: {e}"))?;
    std::fs::write(&path, page).map_err(|e| format!("{}: {e}", path.display()))?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
