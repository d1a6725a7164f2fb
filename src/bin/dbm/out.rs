//! Writing to stdout without panicking: `print!` panics when stdout is a closed pipe
//! (`dbm dump IMG B | head`); this reports other write errors and stops quietly on a
//! broken pipe.

use std::io::{ErrorKind, Write};

/// Writes `s` to stdout and flushes. A closed pipe is not an error: the reader has what
/// it wanted.
pub fn emit(s: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != ErrorKind::BrokenPipe => Err(format!("writing to stdout: {e}")),
        _ => Ok(()),
    }
}

/// [`emit`] for what a command prints after its change is committed to the image: a write
/// error can no longer mean that nothing happened, so it is a warning on stderr and the
/// command's exit status stays what the change earned (a script that saw 1 would retry a
/// change that is already there, or miss a notice such as "made all dirty").
pub fn emit_done(s: &str) {
    if let Err(e) = emit(s) {
        warn_done(&e);
        let _ = std::io::stderr().lock().write_all(s.as_bytes());
    }
}

/// The warning of [`emit_done`], for a report that could not be made (`why`) after the
/// change was committed.
pub fn warn_done(why: &str) {
    let _ = writeln!(
        std::io::stderr().lock(),
        "dbm: warning: the change is committed, but its report was lost: {why}"
    );
}

/// `println!` through [`emit`], for reports whose lines are not worth an error: a closed
/// pipe, or any other write error, loses the line and never panics (`println!` panics on
/// both, `dbm bench flush | head`).
macro_rules! outln {
    () => {{
        let _ = $crate::out::emit("\n");
    }};
    ($($arg:tt)*) => {{
        let _ = $crate::out::emit(&format!("{}\n", format_args!($($arg)*)));
    }};
}
pub(crate) use outln;

/// Writes `s` to stderr. An error (a closed or full stderr) loses it and never panics, so
/// the exit status stays the command's (`eprint!` panics: exit 101, after a committed
/// change too).
pub fn to_stderr(s: &str) {
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// `eprintln!` through [`to_stderr`]: a line lost to a stderr that cannot be written never
/// panics.
macro_rules! errln {
    ($($arg:tt)*) => {{
        $crate::out::to_stderr(&format!("{}\n", format_args!($($arg)*)));
    }};
}
pub(crate) use errln;
