//! Installing the core handler on the node, and putting the previous one back.
//!
//! The kernel runs the `core_pattern` program in its own mount namespace, so the agent copies
//! its binary into the state dir, which is a host directory, and checks that the copy runs
//! with the host's libraries (`chroot` into the host root) before it points the pattern at
//! it. The replaced settings are written first, so the handler chains to them from the first
//! dump on and `uninstall` (also on drop) restores them. A handler left installed by an agent
//! that was killed keeps working and chaining without the agent.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::pattern::{self, Previous};
use super::{HandlerConfig, Spool};

/// `core_pipe_limit` while the handler is installed, unless it was higher: how many dumps
/// may be analysed at once, each keeping its process in `/proc` until the handler exits.
pub const PIPE_LIMIT: u32 = 64;

/// Where things are, as the agent sees them and as the host does.
#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// The kernel's sysctl directory (`/proc/sys/kernel`).
    pub kernel_dir: PathBuf,
    /// The agent's state dir, as the agent sees it.
    pub state_dir: PathBuf,
    /// The same directory's path on the host (the handler runs there).
    pub host_state_dir: PathBuf,
    /// The host's root as the agent sees it (`/` on the host, `/host` in the pod).
    pub host_root: PathBuf,
    /// The node's debug dirs (host paths).
    pub debug_dirs: Vec<PathBuf>,
    /// The container runtime's state dir (host path).
    pub runtime_state_dir: PathBuf,
}

/// The installed handler; dropping it restores the previous settings.
#[derive(Debug)]
pub struct CoreHandler {
    kernel_dir: PathBuf,
    pattern: String,
    previous: Previous,
    spool: Spool,
}

/// The handler binary's path under a state dir.
fn handler_binary(state_dir: &Path) -> PathBuf {
    state_dir.join("bin").join("crashwatch-agent")
}

impl CoreHandler {
    /// Installs the handler: copies this binary into the state dir, checks it runs on the
    /// host, records the settings it replaces, and sets `core_pattern` and `core_pipe_limit`.
    pub fn install(config: &InstallConfig) -> anyhow::Result<CoreHandler> {
        let binary = handler_binary(&config.state_dir);
        let host_binary = handler_binary(&config.host_state_dir);
        let pattern =
            pattern::handler_pattern(&host_binary.to_string_lossy()).map_err(anyhow::Error::msg)?;
        copy_self(&binary)?;
        check_runs_on_host(&host_binary, &config.host_root)?;

        let pattern_file = config.kernel_dir.join("core_pattern");
        let limit_file = config.kernel_dir.join("core_pipe_limit");
        let current = read_sysctl(&pattern_file)?;
        let current_limit: u32 = read_sysctl(&limit_file)?.parse().unwrap_or(0);
        let previous = if pattern::is_ours(&current) {
            // Ours already (a restart after a kill): what it replaced is on record.
            HandlerConfig::load(&config.state_dir)
                .map(|c| c.previous)
                .unwrap_or(Previous {
                    pattern: "core".into(),
                    pipe_limit: 0,
                })
        } else {
            Previous {
                pattern: current,
                pipe_limit: current_limit,
            }
        };
        HandlerConfig {
            previous: previous.clone(),
            debug_dirs: config.debug_dirs.clone(),
            runtime_state_dir: config.runtime_state_dir.clone(),
        }
        .store(&config.state_dir)
        .context("cannot record the core handler's settings")?;
        let limit = previous.pipe_limit.max(PIPE_LIMIT);
        std::fs::write(&limit_file, limit.to_string())
            .with_context(|| format!("cannot write {}", limit_file.display()))?;
        if let Err(err) = std::fs::write(&pattern_file, &pattern) {
            let _ = std::fs::write(&limit_file, previous.pipe_limit.to_string());
            return Err(err).with_context(|| format!("cannot write {}", pattern_file.display()));
        }
        tracing::info!(%pattern, previous = %previous.pattern, "core handler installed");
        Ok(CoreHandler {
            kernel_dir: config.kernel_dir.clone(),
            pattern,
            previous,
            spool: Spool::in_state_dir(&config.state_dir),
        })
    }

    /// The spool the handler writes into.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Puts the previous `core_pattern` and `core_pipe_limit` back, unless someone else has
    /// replaced the pattern since (theirs stays).
    pub fn uninstall(&self) -> anyhow::Result<()> {
        let pattern_file = self.kernel_dir.join("core_pattern");
        let current = read_sysctl(&pattern_file)?;
        if current != self.pattern {
            tracing::warn!(%current, "core_pattern was changed by someone else; leaving it");
            return Ok(());
        }
        std::fs::write(&pattern_file, &self.previous.pattern)
            .with_context(|| format!("cannot write {}", pattern_file.display()))?;
        let limit_file = self.kernel_dir.join("core_pipe_limit");
        std::fs::write(&limit_file, self.previous.pipe_limit.to_string())
            .with_context(|| format!("cannot write {}", limit_file.display()))?;
        tracing::info!(pattern = %self.previous.pattern, "previous core handler restored");
        Ok(())
    }
}

impl Drop for CoreHandler {
    fn drop(&mut self) {
        if let Err(err) = self.uninstall() {
            tracing::error!(%err, "cannot restore the previous core handler");
        }
    }
}

fn read_sysctl(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim_end_matches('\n')
        .to_owned())
}

/// Copies the running binary to `to`, atomically (a handler may be running the old copy).
fn copy_self(to: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().expect("a path in a dir");
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(".crashwatch-agent.{}", std::process::id()));
    std::fs::copy("/proc/self/exe", &tmp)
        .with_context(|| format!("cannot copy the agent's binary to {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, to).with_context(|| format!("cannot install {}", to.display()))?;
    Ok(())
}

/// Runs `host_binary coredump --check` as the kernel would: with the host's root, so that
/// the host's dynamic loader and libraries are the ones used.
fn check_runs_on_host(host_binary: &Path, host_root: &Path) -> anyhow::Result<()> {
    let mut command = Command::new(host_binary);
    command.args(["coredump", "--check"]);
    if host_root != Path::new("/") {
        let root = std::ffi::CString::new(host_root.as_os_str().as_encoded_bytes())?;
        // SAFETY: chroot and chdir are async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(move || {
                if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let output = command
        .output()
        .with_context(|| format!("cannot run {} on the host", host_binary.display()))?;
    if !output.status.success() || output.stdout != b"ok\n" {
        bail!(
            "the handler {} does not run on the host ({}): {}",
            host_binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
