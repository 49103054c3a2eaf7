//! A checkpoint's chat template: the Jinja program that turns a
//! conversation into the prompt text, rendered as transformers'
//! `apply_chat_template` renders it (utils/chat_template_utils.py), so the
//! text the model reads is byte for byte the same.
//!
//! transformers renders in a sandboxed Jinja2 environment with
//! `trim_blocks` and `lstrip_blocks`, the loop-control extension, its own
//! `tojson` (Python's `json.dumps`, non-ASCII kept), `raise_exception`, and
//! a `{% generation %}` tag that marks assistant text and renders its body
//! unchanged. minijinja gives the same language; the tag becomes a plain
//! block with the same whitespace control.

use std::path::Path;

use anyhow::{Context, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use super::regular_file::read_text;

/// One part of a message's content, as transformers' processors take it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Content {
    Image,
    Text { text: String },
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: Vec<Content>,
}

impl Message {
    /// A user turn: the image (if any) first, then the text, as the
    /// examples of LLaVA's model cards write it.
    pub fn user(text: &str, with_image: bool) -> Self {
        let mut content = Vec::new();
        if with_image {
            content.push(Content::Image);
        }
        content.push(Content::Text { text: text.into() });
        Self {
            role: "user".into(),
            content,
        }
    }

    pub fn assistant(text: &str) -> Self {
        Self {
            role: "assistant".into(),
            content: vec![Content::Text { text: text.into() }],
        }
    }

    pub fn system(text: &str) -> Self {
        Self {
            role: "system".into(),
            content: vec![Content::Text { text: text.into() }],
        }
    }
}

/// A compiled chat template and the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ...: the tokenizer's special tokens map,
    /// which transformers passes to every template.
    special_tokens: Vec<(String, String)>,
    /// Where the template came from, for error messages.
    origin: String,
}

/// The tokenizer_config.json keys transformers' `special_tokens_map` holds.
const SPECIAL_TOKEN_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

impl ChatTemplate {
    /// The template of a model, where transformers' processor looks for
    /// it: `chat_template` (`chat_template.jinja`, or `chat_template.json`
    /// holding `{"chat_template": ...}`), then processor_config.json's
    /// `chat_template`, then tokenizer_config.json's. `None` when the model
    /// has none. The special tokens come from tokenizer_config.json.
    pub fn find(
        chat_template: Option<&Path>,
        processor_config: Option<&Path>,
        tokenizer_config: Option<&Path>,
    ) -> Result<Option<Self>> {
        let special_tokens = match tokenizer_config {
            Some(path) => special_tokens_of(path)?,
            None => Vec::new(),
        };
        if let Some(path) = chat_template.filter(|p| p.extension().is_some_and(|e| e == "jinja")) {
            let source = read_text(path)?;
            return Self::new(&source, special_tokens, &path.display().to_string()).map(Some);
        }
        let candidates = [chat_template, processor_config, tokenizer_config];
        for path in candidates.into_iter().flatten() {
            let json: serde_json::Value = serde_json::from_str(&read_text(path)?)
                .with_context(|| format!("parsing {}", path.display()))?;
            if let Some(source) = template_in(&json) {
                return Self::new(&source, special_tokens, &path.display().to_string()).map(Some);
            }
        }
        Ok(None)
    }

    /// Compiles `source`; `origin` names it in errors.
    pub fn new(source: &str, special_tokens: Vec<(String, String)>, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", generation_tags_as_blocks(source))
            .map_err(|e| anyhow::anyhow!("the chat template in {origin} does not compile: {e}"))?;
        Ok(Self {
            env,
            special_tokens,
            origin: origin.to_string(),
        })
    }

    /// The prompt text of `messages`; with `add_generation_prompt`, ending
    /// where the assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").expect("added in new()");
        let mut context: std::collections::BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        context.insert("messages".into(), Value::from_serialize(messages));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        template
            .render(context)
            .map_err(|e| anyhow::anyhow!("the chat template in {} failed: {e}", self.origin))
    }
}

/// A template's text in a JSON file: `"chat_template": "..."`. (A list of
/// named templates, as some tokenizer configs hold, gives the `default` one.)
fn template_in(json: &serde_json::Value) -> Option<String> {
    match json.get("chat_template")? {
        serde_json::Value::String(source) => Some(source.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(serde_json::Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// tokenizer_config.json's special tokens, each a string or an
/// `{"content": ...}` object.
fn special_tokens_of(path: &Path) -> Result<Vec<(String, String)>> {
    let json: serde_json::Value = serde_json::from_str(&read_text(path)?)
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(SPECIAL_TOKEN_KEYS
        .iter()
        .filter_map(|&key| {
            let token = json.get(key)?;
            let text = token.as_str().or_else(|| token.get("content")?.as_str())?;
            Some((key.to_string(), text.to_string()))
        })
        .collect())
}

/// transformers' `{% generation %}…{% endgeneration %}` (an extension of its
/// own) as `{% if true %}…{% endif %}`: the body renders unchanged and the
/// tags keep their whitespace control (`{%-`, `-%}`) and trim_blocks effect.
fn generation_tags_as_blocks(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_dash, inner) = match inner.strip_prefix('-') {
            Some(stripped) => ("-", stripped),
            None => ("", inner),
        };
        let (close_dash, inner) = match inner.strip_suffix('-') {
            Some(stripped) => ("-", stripped),
            None => ("", inner),
        };
        match inner.trim() {
            "generation" => out.push_str(&format!("{{%{open_dash} if true {close_dash}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open_dash} endif {close_dash}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `raise_exception(message)`: a template refusing a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent)`: keys in insertion order, separators `", "` and `": "`
/// without an indent (minijinja's own escapes HTML characters and packs
/// tightly).
fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    python_json(&value, indent, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn python_json(
    value: &Value,
    indent: Option<usize>,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    let quoted = |text: &str| serde_json::Value::String(text.to_string()).to_string();
    match value.kind() {
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
            let is_map = value.kind() == ValueKind::Map;
            let items: Vec<Value> = value.try_iter()?.collect();
            out.push(if is_map { '{' } else { '[' });
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                if is_map {
                    out.push_str(&quoted(&item.to_string()));
                    out.push_str(": ");
                    python_json(&value.get_item(item)?, indent, depth + 1, out)?;
                } else {
                    python_json(item, indent, depth + 1, out)?;
                }
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(if is_map { '}' } else { ']' });
        }
        ValueKind::None | ValueKind::Undefined => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        _ => out.push_str(&quoted(value.as_str().unwrap_or(&value.to_string()))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llava-hf/llava-1.5's template, verbatim.
    const LLAVA_15: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

    fn llava() -> ChatTemplate {
        ChatTemplate::new(LLAVA_15, vec![], "test").unwrap()
    }

    #[test]
    fn renders_llava_15_prompts() {
        let first = [Message::user("What is this?", true)];
        assert_eq!(
            llava().render(&first, true).unwrap(),
            "USER: <image>\nWhat is this? ASSISTANT:"
        );
        let second = [
            Message::user("What is this?", true),
            Message::assistant("A car."),
            Message::user("How old is it?", false),
        ];
        assert_eq!(
            llava().render(&second, true).unwrap(),
            "USER: <image>\nWhat is this? ASSISTANT: A car. USER: How old is it? ASSISTANT:"
        );
        assert!(!llava()
            .render(&second, false)
            .unwrap()
            .ends_with("ASSISTANT:"));
    }

    #[test]
    fn generation_tags_keep_their_whitespace_control() {
        assert_eq!(
            generation_tags_as_blocks("a {%- generation %}b{% endgeneration -%} c"),
            "a {%- if true %}b{% endif -%} c"
        );
        assert_eq!(
            generation_tags_as_blocks("{{ x }} {% if y %}"),
            "{{ x }} {% if y %}"
        );
    }

    #[test]
    fn special_tokens_reach_the_template_and_exceptions_are_errors() {
        let template = ChatTemplate::new(
            "{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}",
            vec![("bos_token".into(), "<s>".into())],
            "test",
        )
        .unwrap();
        assert_eq!(
            template
                .render(&[Message::user("hi", false)], false)
                .unwrap(),
            "<s>"
        );
        let two = [Message::user("a", false), Message::user("b", false)];
        let err = template.render(&two, false).unwrap_err().to_string();
        assert!(err.contains("one message only"), "{err}");
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let template = ChatTemplate::new("{{ messages[0] | tojson }}", vec![], "test").unwrap();
        assert_eq!(
            template
                .render(&[Message::user("café <b>", false)], false)
                .unwrap(),
            r#"{"role": "user", "content": [{"type": "text", "text": "café <b>"}]}"#
        );
    }

    #[test]
    fn a_broken_template_names_its_file() {
        let err = ChatTemplate::new("{% for %}", vec![], "x/chat_template.jinja")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("x/chat_template.jinja"), "{err}");
    }
}
