//! SIGINT and SIGTERM as a request to stop, for the commands that run a guest until told
//! (`dbm migrate listen`, from the guest's start here; `dbm migrate send`, from its
//! activation of the image): the guest then stops and the image is inactivated as at the
//! end of the run, instead of the process dying with its bitmaps `in_use`. And, for `dbm create`, as the end of the process that first
//! removes the file it was making ([`remove_on_signal`]).

use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::time::{Duration, Instant};

/// Set by the handler; read by [`run_for`].
static STOP: AtomicBool = AtomicBool::new(false);

/// The handler: one atomic store, which is async-signal-safe.
extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// From here on, SIGINT and SIGTERM set the stop request instead of ending the process:
/// for a command from the point it holds an image active, so that a signal is a clean
/// stop (the image inactivated) instead of the process dying with its bitmaps `in_use`.
/// A signal the process ignores (a command started in the background of a script ignores
/// SIGINT) stays ignored: a Ctrl-C meant for the script is not a stop request.
pub fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `sigaction` reads the current disposition into a zeroed struct; `signal`
        // then replaces the default action (or this handler itself) with `on_signal`,
        // which only stores to an atomic. Nothing else in `dbm` handles these two signals
        // while a command that installs this runs.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            libc::signal(sig, handler);
        }
    }
}

/// How a [`run_for`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The time was up.
    TimeUp,
    /// SIGINT or SIGTERM came first.
    Signal,
}

/// Waits `d`, or until SIGINT or SIGTERM (handled from this call on); returns which came
/// first and how long it waited.
pub fn run_for(d: Duration) -> (Ended, Duration) {
    install();
    sleep_unless_stopped(d)
}

/// Waits `d`, in slices of at most 20 ms, or until a stop request ([`stop_requested`]);
/// returns which came first and how long it waited. Installs no handler: before the first
/// [`run_for`] or [`await_verdict`], SIGINT and SIGTERM still end the process.
pub fn sleep_unless_stopped(d: Duration) -> (Ended, Duration) {
    let start = Instant::now();
    loop {
        if STOP.load(Ordering::SeqCst) {
            return (Ended::Signal, start.elapsed());
        }
        let waited = start.elapsed();
        if waited >= d {
            return (Ended::TimeUp, waited);
        }
        std::thread::sleep((d - waited).min(Duration::from_millis(20)));
    }
}

/// Set by the SIGUSR1 handler; read by [`await_verdict`], which clears it before it asks,
/// so that a verdict answers only the question asked after it: a SIGUSR1 given for an
/// earlier attempt's unknown outcome must never fail back from a later one.
static GONE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    GONE.store(true, Ordering::SeqCst);
}

/// The operator's word on a destination that never answered ([`await_verdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// SIGUSR1: the destination is gone and did not start the guest; the source may take
    /// it back.
    DestinationGone,
    /// SIGINT or SIGTERM: no such word; the source stays stopped.
    Stop,
}

/// Whether SIGINT or SIGTERM came since the first [`run_for`] or [`await_verdict`]
/// installed the handlers: a stop request, kept until the process ends (from then on the
/// two signals no longer end the process, so the request is honoured at the next point
/// that looks at it).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Installs the handlers (SIGUSR1, and SIGINT and SIGTERM as in [`run_for`]), forgets any
/// earlier SIGUSR1, then calls `armed` (which says what the process waits for: a signal
/// sent after it is caught), then waits for one of them. A stop request made before
/// ([`stop_requested`]) is the answer [`Verdict::Stop`] at once: the source stays stopped,
/// which is never wrong.
pub fn await_verdict(armed: impl FnOnce()) -> Verdict {
    install();
    let handler = on_usr1 as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    // SAFETY: `on_usr1` only stores to an atomic; nothing else in `dbm` handles SIGUSR1.
    unsafe {
        libc::signal(libc::SIGUSR1, handler);
    }
    // After the handler is in place and before the question is asked: a SIGUSR1 in
    // between is for an earlier question (or none) and is dropped; one sent after
    // `armed` is caught.
    GONE.store(false, Ordering::SeqCst);
    armed();
    loop {
        if GONE.load(Ordering::SeqCst) {
            return Verdict::DestinationGone;
        }
        if STOP.load(Ordering::SeqCst) {
            return Verdict::Stop;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path [`remove_on_signal`] removes, NUL-terminated (null: none). Owned by the
/// [`RemoveOnSignal`] guard, or, once the handler took it, leaked to the dying process.
static DOOMED: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

/// The handler of [`REMOVING`]'s signals while a [`RemoveOnSignal`] lives: removes the
/// path, then dies of the signal as without the handler.
extern "C" fn remove_and_die(sig: libc::c_int) {
    let p = DOOMED.swap(std::ptr::null_mut(), Ordering::SeqCst);
    // SAFETY: `unlink`, `signal` and `raise` are async-signal-safe; `p` is null or the
    // guard's NUL-terminated string, which the swap took from it (the guard then frees
    // nothing), so it lives until the process ends.
    unsafe {
        if !p.is_null() {
            libc::unlink(p);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// The signals [`remove_on_signal`] handles: an interrupt, a kill, a hang-up (a dropped
/// ssh session).
const REMOVING: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// While it lives, SIGINT, SIGTERM and SIGHUP remove a file before they end the process
/// (see [`remove_on_signal`]).
pub struct RemoveOnSignal {
    /// The signals whose handler it replaced, with the disposition to put back.
    replaced: Vec<(libc::c_int, libc::sigaction)>,
}

impl std::fmt::Debug for RemoveOnSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let signals: Vec<libc::c_int> = self.replaced.iter().map(|(s, _)| *s).collect();
        f.debug_struct("RemoveOnSignal")
            .field("signals", &signals)
            .finish()
    }
}

/// Until the guard drops, SIGINT, SIGTERM and SIGHUP remove `path`, then end the process
/// as without a handler (for a file made under a temporary name: `dbm create`). A signal
/// the process ignores (a command started in the background of a script ignores SIGINT)
/// stays ignored. A path that does not exist yet, or no longer, is left alone. `None` for
/// a path with a NUL byte.
pub fn remove_on_signal(path: &std::path::Path) -> Option<RemoveOnSignal> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let old = DOOMED.swap(c.into_raw(), Ordering::SeqCst);
    if !old.is_null() {
        // SAFETY: a pointer stored here comes from `CString::into_raw`, and the swap took
        // it from the handler's reach.
        drop(unsafe { std::ffi::CString::from_raw(old) });
    }
    let handler = remove_and_die as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    let mut replaced = Vec::new();
    for sig in REMOVING {
        // SAFETY: `sigaction` reads the current disposition into a zeroed struct, then
        // installs `remove_and_die`, which makes async-signal-safe calls only; the guard
        // puts the old disposition back.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = handler;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(sig, &new, std::ptr::null_mut()) == 0 {
                replaced.push((sig, old));
            }
        }
    }
    Some(RemoveOnSignal { replaced })
}

impl Drop for RemoveOnSignal {
    fn drop(&mut self) {
        for (sig, old) in &self.replaced {
            // SAFETY: puts back the disposition `remove_on_signal` read.
            unsafe {
                libc::sigaction(*sig, old, std::ptr::null_mut());
            }
        }
        let p = DOOMED.swap(std::ptr::null_mut(), Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: from `CString::into_raw`; the swap took it from the handler.
            drop(unsafe { std::ffi::CString::from_raw(p) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{await_verdict, Verdict};
    use std::sync::mpsc;
    use std::time::Duration;

    fn raise_usr1() {
        // SAFETY: raising a signal whose handler `await_verdict` installed (an atomic store).
        unsafe {
            libc::raise(libc::SIGUSR1);
        }
    }

    /// The SIGUSR1 flag is cleared once a wait has taken it: with
    /// `send --attempts N --fail-back-on-signal`, the verdict given for one attempt's
    /// unknown outcome must not answer every later one at once (the source failing back
    /// while the destination may run the guest). A second wait must wait for a signal of
    /// its own.
    #[test]
    fn a_verdict_answers_only_the_wait_it_was_given_for() {
        assert_eq!(await_verdict(raise_usr1), Verdict::DestinationGone);
        let (tx, rx) = mpsc::channel();
        let (armed_tx, armed_rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let v = await_verdict(|| armed_tx.send(()).unwrap());
            tx.send(v).unwrap();
        });
        armed_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(
            rx.recv_timeout(Duration::from_millis(200)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "the second wait took the first wait's verdict"
        );
        raise_usr1();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)),
            Ok(Verdict::DestinationGone)
        );
        waiter.join().unwrap();
    }
}
