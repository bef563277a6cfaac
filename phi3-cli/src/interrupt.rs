//! Ctrl-C: the first press stops the generation in progress, a second one (or one while nothing is
//! generating) exits with status 130.
//!
//! The handler runs on ctrlc's own thread. It reaches the running generation through a global
//! slot holding that session's [`CancelToken`]; [`Interrupt::guard`] fills the slot for the
//! duration of one generation, so a press between generations (e.g. while `chat` waits for input)
//! exits at once.

use std::sync::{Mutex, PoisonError};

use phi3_core::CancelToken;

/// The exit status of a process ended by SIGINT (128 + 2), as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;

static CURRENT: Mutex<Option<CancelToken>> = Mutex::new(None);

/// Install the Ctrl-C handler. Call once, before any generation.
pub fn install() -> anyhow::Result<()> {
    ctrlc::set_handler(on_interrupt)
        .map_err(|e| anyhow::anyhow!("cannot install the Ctrl-C handler: {e}"))
}

fn on_interrupt() {
    let slot = CURRENT.lock().unwrap_or_else(PoisonError::into_inner);
    match slot.as_ref() {
        Some(token) if !token.is_cancelled() => {
            token.cancel();
            eprintln!("\n[stopping: press Ctrl-C again to quit]");
        }
        _ => {
            eprintln!();
            std::process::exit(EXIT_INTERRUPTED.into());
        }
    }
}

/// While alive, Ctrl-C cancels `token` instead of exiting.
pub struct Interrupt(());

impl Interrupt {
    pub fn guard(token: CancelToken) -> Interrupt {
        *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = Some(token);
        Interrupt(())
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}
