//! SIGINT and SIGTERM as a request to stop, for the commands that run a guest until told
//! (`dbm migrate listen --run-for`, `dbm migrate send --run-for`): the guest then stops
//! and the image is inactivated as at the end of the run, instead of the process dying with
//! its bitmaps `in_use`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Set by the handler; read by [`run_for`].
static STOP: AtomicBool = AtomicBool::new(false);

/// The handler: one atomic store, which is async-signal-safe.
extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// From here on, SIGINT and SIGTERM set the stop request instead of ending the process.
fn install() {
    let handler = on_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    // SAFETY: `on_signal` only stores to an atomic; `signal` replaces the default action
    // of two signals, which nothing else in `dbm` handles.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
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
