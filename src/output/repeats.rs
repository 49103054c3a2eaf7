//! `--trim-repeats`: captions caught in a repetition loop, the failure
//! greedy and beam decoding fall into on pictures a model is unsure of ("a
//! hat on top of a hat on top of a hat", "ray ban ray ban ray ban
//! sunglasses"), trimmed to one turn of the loop. A caption without one is
//! returned as it is, so the option changes nothing else; without it the
//! output stays transformers' own.
//!
//! A loop is a run of words repeated back to back: a phrase of 2 to
//! [`MAX_PHRASE`] words twice or more, or one word three times or more
//! ("very very" is English; "a a a" is not). The run keeps its first turn;
//! a partial turn after the last full one is kept too, so the sentence still
//! ends where it ended ("a hat on top of a hat").

use std::borrow::Cow;

/// The longest phrase looked for, in words: BLIP's loops are short.
pub const MAX_PHRASE: usize = 8;

/// `text` with every repetition loop cut to one turn; the words keep their
/// spacing where nothing is cut (words are split on whitespace and joined
/// by one space only when something was removed).
pub fn trim_repeats(text: &str) -> Cow<'_, str> {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    let mut changed = false;
    let mut i = 0;
    'scan: while i < words.len() {
        for n in 1..=MAX_PHRASE.min((words.len() - i) / 2) {
            let turns = turns_at(&words, i, n);
            if turns >= 3 || (n >= 2 && turns >= 2) {
                words.drain(i + n..i + turns * n);
                changed = true;
                // Look again here: a shorter loop may start at the same word.
                continue 'scan;
            }
        }
        i += 1;
    }
    if changed {
        Cow::Owned(words.join(" "))
    } else {
        Cow::Borrowed(text)
    }
}

/// How many times the `n` words at `i` occur back to back from `i`.
fn turns_at(words: &[&str], i: usize, n: usize) -> usize {
    let phrase = &words[i..i + n];
    let mut turns = 1;
    while words.len() >= i + (turns + 1) * n && &words[i + turns * n..i + (turns + 1) * n] == phrase
    {
        turns += 1;
    }
    turns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_are_cut_to_one_turn() {
        for (looping, trimmed) in [
            (
                "a hat on top of a hat on top of a hat",
                "a hat on top of a hat",
            ),
            ("ray ban ray ban ray ban sunglasses", "ray ban sunglasses"),
            (
                "a man with a hat and a hat and a hat",
                "a man with a hat and a hat",
            ),
            (
                "a kitchen with a sink and a sink and a sink and a sink",
                "a kitchen with a sink and a sink",
            ),
            ("the the the cat", "the cat"),
            (
                "a bird on a branch on a branch on a branch on a branch",
                "a bird on a branch",
            ),
        ] {
            assert_eq!(trim_repeats(looping), trimmed, "{looping}");
            // Trimming twice changes nothing more.
            assert_eq!(trim_repeats(trimmed), trimmed, "{trimmed}");
        }
    }

    /// Every caption and answer transformers gave with the demo models
    /// (tests/fixtures/reference/demo*.json: greedy and beam captions,
    /// answers): none has a loop, and none is changed.
    #[test]
    fn the_recorded_demo_outputs_are_untouched() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut texts = Vec::new();
        for file in ["demo.json", "demo-llava.json"] {
            let path = root.join("tests/fixtures/reference").join(file);
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
            collect_texts(&json, &mut texts);
        }
        assert!(texts.len() > 1000, "{}", texts.len());
        for text in &texts {
            assert_eq!(trim_repeats(text), text.as_str());
        }
    }

    fn collect_texts(json: &serde_json::Value, into: &mut Vec<String>) {
        match json {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    match value.as_str() {
                        Some(text) if key == "text" || key == "caption" => into.push(text.into()),
                        _ => collect_texts(value, into),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect_texts(v, into)),
            _ => {}
        }
    }

    #[test]
    fn captions_without_a_loop_are_untouched_even_their_spacing() {
        for text in [
            "a very very tall building",
            "a dog and a cat on a bed",
            "two dogs, two cats",
            "  spaced   out  ",
            "",
            "a small red square, a large blue triangle and a small yellow square on a gray background",
        ] {
            assert!(matches!(trim_repeats(text), Cow::Borrowed(t) if t == text), "{text}");
        }
    }
}
