//! A progress line on stderr for long runs, drawn only when stderr is a terminal (so logs,
//! pipes and CI output stay clean).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress bar over one phase at a time, counted in seconds. Cloning shares the bar.
#[derive(Debug, Clone)]
pub struct Progress {
    bar: ProgressBar,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::hidden()
    }
}

impl Progress {
    /// Draws nothing (tests, library use).
    pub fn hidden() -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
        }
    }

    /// A bar on stderr if stderr is a terminal, hidden otherwise.
    pub fn stderr() -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos:>4}/{len}s {wide_msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress { bar }
    }

    /// Starts a phase named `name` that lasts about `length`.
    pub fn phase(&self, name: &str, length: Duration) {
        self.bar.set_prefix(name.to_owned());
        self.bar.set_length(length.as_secs().max(1));
        self.bar.set_position(0);
        self.bar.set_message(String::new());
    }

    /// Where the phase is, and a line of figures.
    pub fn update(&self, elapsed: Duration, line: String) {
        self.bar.set_position(elapsed.as_secs());
        self.bar.set_message(line);
    }

    /// Removes the bar (before the summary is printed).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
