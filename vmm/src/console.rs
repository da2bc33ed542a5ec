//! The user's side of the guest console: the terminal's input goes to COM1's receive FIFO, so a
//! user can type into the guest's shell. The terminal is put in non-canonical, no-echo mode
//! while the guest runs (the guest echoes), keeping signals so Ctrl-C still stops the VMM.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use devices::serial::SerialPort;

/// Restores the terminal's settings when dropped.
pub struct TerminalGuard {
    saved: Option<libc::termios>,
}

impl TerminalGuard {
    /// Puts stdin in character mode if it is a terminal.
    pub fn new() -> Self {
        // SAFETY: isatty on a valid descriptor number has no preconditions.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: a zeroed termios is a valid out-parameter for tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: stdin is a terminal and `t` is a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        t.c_cc[libc::VMIN] = 1;
        t.c_cc[libc::VTIME] = 0;
        // SAFETY: applying a termios derived from the terminal's own settings.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        Self { saved: Some(saved) }
    }
}

impl Default for TerminalGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restoring the settings read from this terminal in `new`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// Starts the thread that copies stdin into the UART (it ends at end of input).
pub fn forward_stdin(serial: Arc<SerialPort>) {
    let _ = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = serial.enqueue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        // The guest drains the FIFO at its own pace.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
}
