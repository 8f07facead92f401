//! Stop strings over streamed text.

/// Holds back text that might be the start of a stop string, and reports
/// when one appears (the stop string and what follows are never released).
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds text: what can be released is appended to `ready`; returns
    /// whether a stop string was hit.
    pub fn push(&mut self, delta: &str, ready: &mut String) -> bool {
        if self.stops.is_empty() {
            ready.push_str(delta);
            return false;
        }
        self.pending.push_str(delta);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            ready.push_str(&self.pending[..at]);
            self.pending.clear();
            return true;
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let keep_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        ready.push_str(&self.pending[..keep_from]);
        self.pending.drain(..keep_from);
        false
    }

    /// Releases whatever is held (the generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`StopMatcher::push`] as a pair: the text released and the hit.
    fn push(m: &mut StopMatcher, delta: &str) -> (String, bool) {
        let mut ready = String::new();
        let hit = m.push(delta, &mut ready);
        (ready, hit)
    }

    #[test]
    fn stop_strings_split_across_deltas_are_caught_and_not_emitted() {
        let mut m = StopMatcher::new(&["</end>".to_string()]);
        let mut out = String::new();
        let mut hit = false;
        for d in ["Hello </", "en", "d> tail"] {
            let (r, h) = push(&mut m, d);
            out.push_str(&r);
            if h {
                hit = true;
                break;
            }
        }
        assert!(hit);
        assert_eq!(out, "Hello ");
    }

    #[test]
    fn near_misses_are_released() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(push(&mut m, "a ST"), ("a ".to_string(), false));
        assert_eq!(push(&mut m, "OOP"), ("STOOP".to_string(), false));
        assert_eq!(push(&mut m, "x S"), ("x ".to_string(), false));
        assert_eq!(m.flush(), "S");
    }

    #[test]
    fn multibyte_text_is_held_at_character_boundaries() {
        let mut m = StopMatcher::new(&["。结束".to_string()]);
        assert_eq!(push(&mut m, "你好。"), ("你好".to_string(), false));
        assert_eq!(push(&mut m, "结束了"), ("".to_string(), true));
    }
}
