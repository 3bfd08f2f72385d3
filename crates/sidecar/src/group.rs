//! Handler commands run in a process group of their own. `sh -c CMD` runs CMD as its
//! child rather than in its place, so stopping the shell alone would leave the agent
//! running: redrive stops the whole group. A group of its own also keeps a terminal's
//! Ctrl-C away from handlers, which finish within `--grace` as redrive shuts down.

use rustix::process::{Pid, Signal, kill_process_group};

/// Puts the command's process in a new group, whose id is its pid.
pub(crate) fn own_group(cmd: &mut tokio::process::Command) {
    cmd.process_group(0);
}

/// Sends SIGKILL to the group led by `pid` (a process started with [`own_group`]).
pub(crate) fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        // ESRCH: the group is already gone.
        let _ = kill_process_group(pid, Signal::KILL);
    }
}

/// Kills a command's group when dropped before [`GroupGuard::exited`]: a handler whose
/// future is dropped (its timeout, or the end of the grace period) takes with it
/// everything its command started.
pub(crate) struct GroupGuard(Option<u32>);

impl GroupGuard {
    pub(crate) fn new(pid: Option<u32>) -> Self {
        Self(pid)
    }

    /// The command exited on its own, or something else now answers for it: nothing to
    /// stop.
    pub(crate) fn exited(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            kill(pid);
        }
    }
}

/// Test support: a `sleep` a command starts in the background, a grandchild of
/// redrive's, to see whether stopping the command stops it too.
#[cfg(test)]
pub(crate) struct Grandchild(std::path::PathBuf);

#[cfg(test)]
impl Grandchild {
    pub(crate) fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("redrive-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        Self(dir)
    }

    /// Shell that starts it and notes its pid.
    pub(crate) fn start(&self) -> String {
        format!("sleep 30 & echo $! > {}", self.0.join("pid").display())
    }

    /// Its pid, once started.
    pub(crate) fn pid(&self) -> u32 {
        let pid = std::fs::read_to_string(self.0.join("pid")).expect("the grandchild's pid");
        pid.trim().parse().expect("a pid")
    }

    /// Whether it is gone (exited, or a zombie awaiting its parent), waiting up to 5 s.
    pub(crate) async fn gone(&self) -> bool {
        let stat = format!("/proc/{}/stat", self.pid());
        for _ in 0..100 {
            match std::fs::read_to_string(&stat) {
                Err(_) => return true,
                Ok(s)
                    if s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z')) =>
                {
                    return true;
                }
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        false
    }
}

#[cfg(test)]
impl Drop for Grandchild {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
