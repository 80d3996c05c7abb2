//! Stop sequences matched on text, across token boundaries; the matched text is not emitted.

/// Holds back text that might be the start of a stop sequence until it is known not to be.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What to do with a new piece of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Emit this text (possibly empty) and go on.
    Continue(String),
    /// A stop sequence matched: emit this text (what came before it) and finish.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(piece.to_string());
        }
        self.pending.push_str(piece);
        let first_match = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_match {
            let before = self.pending[..at].to_string();
            self.pending.clear();
            return StopCheck::Stopped(before);
        }
        let held = self.longest_partial_suffix();
        let emit_to = self.pending.len() - held;
        let emitted = self.pending[..emit_to].to_string();
        self.pending.drain(..emit_to);
        StopCheck::Continue(emitted)
    }

    /// Text held back when generation ends for another reason; it was no stop sequence.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Length in bytes of the longest suffix of `pending` that is a proper prefix of a stop.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for stop in &self.stops {
            for (len, _) in stop.char_indices().skip(1) {
                if len > best && self.pending.ends_with(&stop[..len]) {
                    best = len;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Continue(t) => out.push_str(&t),
                StopCheck::Stopped(t) => {
                    out.push_str(&t);
                    return (out, true);
                }
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn a_stop_split_across_tokens_is_matched_and_not_emitted() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\nWorld"]),
            ("Hello".into(), true)
        );
        assert_eq!(run(&["END"], &["ab", "E", "N", "Dcd"]), ("ab".into(), true));
    }

    #[test]
    fn a_false_start_is_released_once_it_stops_matching() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("aE"), StopCheck::Continue("a".into()));
        assert_eq!(m.push("N"), StopCheck::Continue("".into()));
        assert_eq!(m.push("x"), StopCheck::Continue("ENx".into()));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        assert_eq!(run(&["c", "ab"], &["xabc"]), ("x".into(), true));
    }

    #[test]
    fn held_text_is_flushed_when_generation_ends_otherwise() {
        assert_eq!(run(&["END"], &["abc", "EN"]), ("abcEN".into(), false));
    }

    #[test]
    fn multibyte_stops_work() {
        assert_eq!(run(&["😀!"], &["hi ", "😀", "!"]), ("hi ".into(), true));
    }
}
