//! SIGTERM and SIGINT as a clean shutdown: the signals are blocked in every
//! thread (the mask is set before any thread starts and inherited) and one
//! thread takes them with `sigwait`.

use std::io;

/// The blocked signal set.
pub struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    /// Blocks SIGTERM and SIGINT in the calling thread (and every thread it
    /// starts afterwards).
    pub fn block() -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it fully
        // before any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid, exclusively borrowed sigset_t; the
        // signal numbers are valid.
        let r = unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(Signals { set })
    }

    /// Starts the thread that waits for one of the signals and calls `on`
    /// with its name.
    pub fn spawn_waiter(self, on: impl FnOnce(&'static str) + Send + 'static) {
        let set = self.set;
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is an initialised sigset_t owned by this
                // thread; `sig` is a valid out pointer.
                let r = unsafe { libc::sigwait(&set, &mut sig) };
                if r == 0 {
                    on(if sig == libc::SIGTERM {
                        "SIGTERM"
                    } else {
                        "SIGINT"
                    });
                    return;
                }
            });
    }
}
