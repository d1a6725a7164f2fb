//! The destination's side of a migrated state other than RAM ([`DestState`]): what a
//! destination does when the Hello declares the state, when its sections arrive, just
//! before it starts the guest, and when the attempt fails.

use std::sync::{Arc, Mutex};

use super::error::{MigrationError, Result};
use super::frame::StateId;

/// What binds a destination state's data to one migration, so that a later attempt
/// resumes it only if it belongs to the same one: the Hello's migration id, and the
/// migration's token when the destination issues nonces (the nonce of its first attempt,
/// which every later attempt names in its Hello's `resume`; 0 without nonces). This is how
/// kept RAM is bound ([`super::dest::RetainedRam`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Binding {
    /// The Hello's migration id.
    pub migration_id: u64,
    /// The migration's token (0 without nonces).
    pub token: u128,
}

/// A destination-side state, registered with the destination by the name its source
/// counterpart ([`super::MigrationState::name`]) declares in the Hello.
///
/// The order of the calls within one attempt: [`hello`](Self::hello) once; then
/// [`section`](Self::section) for each of its sections; [`switchover`](Self::switchover)
/// when the source switches over (precopy or postcopy); then
/// [`before_start`](Self::before_start), after the source's End (precopy) or postcopy
/// Switchover and before the destination answers Started; or [`failed`](Self::failed) if
/// the attempt ends otherwise (a refusal included), never after Started; after a postcopy
/// Started, [`push_ended`](Self::push_ended) at the stream's End, or
/// [`failed_after_start`](Self::failed_after_start) if the stream fails before it. A later
/// attempt starts again with `hello`. A state that wraps another passes every call on:
/// one that drops `switchover` makes a postcopy take-over refuse, and one that drops
/// `push_ended` leaves the stream bitmaps' holds in force until the state is dropped (the
/// store refuses to close meanwhile).
///
/// A shared-storage disk state ([`super::disk::SharedDiskDest`]) opens and activates its
/// image in `before_start`, and puts it back as the source left it in `failed`.
pub trait DestState: Send + std::fmt::Debug {
    /// The state's name, as the source declares it.
    fn name(&self) -> &str;

    /// The Hello of an attempt of the migration `binding` declared this state with section
    /// id `id`. A state that keeps data across attempts resumes it only for the same
    /// binding, and must not drop it here: the Hello may still be refused.
    ///
    /// # Errors
    /// The destination cannot take this state: the Hello is refused.
    fn hello(&mut self, id: StateId, binding: Binding) -> Result<()> {
        let _ = (id, binding);
        Ok(())
    }

    /// A section of this state, in the state's own format. A returned payload goes back to
    /// the source at once as a Report frame ([`super::frame::Frame::Report`]): the answer
    /// to a query of the source's state ([`super::MigrationState::awaits_report`]).
    ///
    /// # Errors
    /// A payload that does not decode or that this state refuses; the attempt fails.
    fn section(&mut self, payload: &[u8]) -> Result<Option<Vec<u8>>> {
        let _ = payload;
        Err(MigrationError::InvalidInput(format!(
            "state {} takes no sections",
            self.name()
        )))
    }

    /// The source switched over: the guest starts here once every section of the stop
    /// arrived (`postcopy` false: at End) or at once, before the rest is pushed (`postcopy`
    /// true). Called for every declared state before [`before_start`](Self::before_start);
    /// a wrapper of a state must pass it on.
    fn switchover(&mut self, postcopy: bool) {
        let _ = postcopy;
    }

    /// Everything of the attempt arrived (End, or the postcopy Switchover), and the
    /// destination is about to answer Started: take over (a disk state activates its
    /// image here, so it holds the bitmaps only once the source has handed them over).
    ///
    /// # Errors
    /// The state cannot take over: the destination refuses to start, with this error's
    /// text as the reason, and calls [`failed`](Self::failed).
    fn before_start(&mut self) -> Result<()> {
        Ok(())
    }

    /// The attempt failed before the guest started here: undo what
    /// [`before_start`](Self::before_start) did, if it ran, so that the source can take
    /// its state back as it left it.
    fn failed(&mut self) {}

    /// The stream's End arrived after the guest started here (postcopy): everything the
    /// source pushed after the start arrived. Not called after a precopy start (the stream
    /// ended before it). A wrapper of a state must pass it on.
    fn push_ended(&mut self) {}

    /// The stream failed after the guest started here (postcopy) and before its End: what
    /// the source still had to push will not come. The guest runs on here (the source
    /// stays stopped), so a state that expected more must make what it holds read as
    /// needing everything, never as complete (a disk bitmap: every granule dirty). The
    /// default does nothing: a state that has all it needs once the guest starts.
    fn failed_after_start(&mut self) {}
}

/// A [`DestState`] shared between the destination and its owner (who reads what it
/// received once the migration is over), and across attempts.
pub type SharedDestState = Arc<Mutex<dyn DestState>>;

/// Locks `s`, also after a panic elsewhere (the state's own methods keep it consistent).
pub(crate) fn lock(s: &SharedDestState) -> std::sync::MutexGuard<'_, dyn DestState + 'static> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
