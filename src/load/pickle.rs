//! Python pickles read as data, never run.
//!
//! A pickle is a program for a stack machine; unpickling it normally imports
//! the modules it names and calls what it builds, which is how `torch.load`
//! of a hostile file runs code. This machine knows only the opcodes that
//! build data (numbers, strings, tuples, lists, dicts) and keeps the rest as
//! inert records: a `GLOBAL` stays a name, a `REDUCE` stays a call nobody
//! makes, a `BINPERSID` stays the id for the caller to resolve.
//!
//! Every object lives in one arena and is referred to by index, so the memo
//! (`BINGET`) shares an object instead of copying it (no "billion laughs"),
//! nesting never makes a recursive drop (no stack overflow on a deep tuple),
//! and the arena holds at most one object per opcode read. Every length the
//! file claims is checked against the bytes that are there before anything
//! is taken from it.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

/// An index into [`Pickle`]'s arena.
pub type Id = usize;

/// One object the pickle built.
#[derive(Debug)]
pub enum Object {
    None,
    /// A bool or a float: read past, never looked at (no tensor record
    /// needs one; `requires_grad` is a bool).
    Scalar,
    Int(i64),
    Str(String),
    /// `module.name`, as `GLOBAL` names it; never imported.
    Global {
        module: String,
        name: String,
    },
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// `callable(*args)` as `REDUCE` or `NEWOBJ` asks for it; never called.
    Call {
        callable: Id,
        args: Id,
    },
    /// `BINPERSID`: an object the loader provides (a tensor's storage, in torch).
    PersistentId(Id),
}

/// The objects a pickle built, and the one it returned.
#[derive(Debug)]
pub struct Pickle {
    objects: Vec<Object>,
    root: Id,
}

impl Pickle {
    /// Runs `bytes` as data only (see the module's documentation).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut machine = Machine {
            input: bytes,
            pos: 0,
            objects: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        };
        let root = machine.run()?;
        Ok(Self {
            objects: machine.objects,
            root,
        })
    }

    /// What the pickle returned (its `STOP`).
    pub fn root(&self) -> Id {
        self.root
    }

    pub fn get(&self, id: Id) -> &Object {
        &self.objects[id]
    }

    pub fn as_tuple(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Object::Tuple(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Object::Str(text) => Some(text),
            _ => None,
        }
    }

    pub fn as_int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Object::Int(value) => Some(*value),
            _ => None,
        }
    }

    /// `(module, name)` if `id` is a `GLOBAL`.
    pub fn as_global(&self, id: Id) -> Option<(&str, &str)> {
        match self.get(id) {
            Object::Global { module, name } => Some((module, name)),
            _ => None,
        }
    }
}

/// The machine's state while it reads: the stack, the positions of the
/// `MARK`s on it (Python's "metastack") and the memo.
struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    objects: Vec<Object>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u32, Id>,
}

impl<'a> Machine<'a> {
    fn run(&mut self) -> Result<Id> {
        loop {
            let at = self.pos;
            let opcode = self.byte()?;
            if opcode == b'.' {
                return self.pop().context("STOP with an empty stack");
            }
            self.step(opcode)
                .with_context(|| format!("pickle opcode 0x{opcode:02x} at byte {at}"))?;
        }
    }

    /// One opcode; the names are pickletools'.
    fn step(&mut self, opcode: u8) -> Result<()> {
        match opcode {
            // PROTO (the version), and FRAME (a hint for buffered readers).
            0x80 => {
                self.byte()?;
            }
            0x95 => {
                self.bytes(8)?;
            }
            b'(' => self.marks.push(self.stack.len()), // MARK
            b'N' => self.push(Object::None),
            0x88 | 0x89 => self.push(Object::Scalar), // NEWTRUE, NEWFALSE
            b'K' => {
                let value = self.byte()?;
                self.push_int(value.into())
            }
            b'M' => {
                let value = u16::from_le_bytes(self.array()?);
                self.push_int(value.into())
            }
            b'J' => {
                let value = i32::from_le_bytes(self.array()?);
                self.push_int(value.into())
            }
            0x8a => self.long1()?,
            b'G' => {
                self.bytes(8)?; // BINFLOAT
                self.push(Object::Scalar)
            }
            b'X' => {
                let len = u32::from_le_bytes(self.array()?);
                self.string(len.into())?
            }
            0x8c => {
                let len = self.byte()?;
                self.string(len.into())?
            }
            0x8d => {
                let len = u64::from_le_bytes(self.array()?);
                self.string(len)?
            }
            b'c' => self.global()?,
            0x93 => self.stack_global()?,
            b')' => self.push(Object::Tuple(Vec::new())),
            b'}' => self.push(Object::Dict(Vec::new())),
            b']' => self.push(Object::List(Vec::new())),
            0x85..=0x87 => self.tuple(usize::from(opcode - 0x84))?,
            b't' => {
                let items = self.pop_mark()?;
                self.push(Object::Tuple(items))
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Object::List(items))
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.push(Object::Dict(pairs))
            }
            b'a' => {
                let item = self.pop()?;
                self.extend_list(vec![item])?
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_list(items)?
            }
            b's' => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_dict(vec![(key, value)])?
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.extend_dict(pairs(&items)?)?
            }
            b'q' => {
                let key = self.byte()?;
                self.put(key.into())?
            }
            b'r' => {
                let key = u32::from_le_bytes(self.array()?);
                self.put(key)?
            }
            0x94 => {
                let key = u32::try_from(self.memo.len()).context("memo is full")?;
                self.put(key)?
            }
            b'h' => {
                let key = self.byte()?;
                self.get(key.into())?
            }
            b'j' => {
                let key = u32::from_le_bytes(self.array()?);
                self.get(key)?
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(Object::PersistentId(id))
            }
            b'R' | 0x81 => self.call()?,
            // BUILD sets the object's attributes (`_metadata` on a state
            // dict's OrderedDict); nothing we read needs them. POP.
            b'b' | b'0' => {
                self.pop()?;
            }
            _ => bail!("is not one that builds data"),
        }
        Ok(())
    }

    fn byte(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.bytes(N)?.try_into()?)
    }

    /// The next `len` bytes of the input, if it has them.
    fn bytes(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&end| end <= self.input.len())
            .with_context(|| {
                format!(
                    "needs {len} bytes where {} remain",
                    self.input.len() - self.pos
                )
            })?;
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// The bytes up to the next newline (a `GLOBAL`'s text arguments).
    fn line(&mut self) -> Result<String> {
        let rest = &self.input[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("a GLOBAL name runs past the end of the pickle")?;
        let line = self.bytes(len + 1)?;
        Ok(String::from_utf8_lossy(&line[..len]).into_owned())
    }

    fn push(&mut self, object: Object) {
        self.stack.push(self.objects.len());
        self.objects.push(object);
    }

    fn push_int(&mut self, value: i64) {
        self.push(Object::Int(value))
    }

    fn pop(&mut self) -> Result<Id> {
        // A pop below the innermost MARK would leave that mark pointing past
        // the stack; Python refuses that too.
        if self.marks.last() == Some(&self.stack.len()) {
            bail!("pops past a MARK");
        }
        self.stack.pop().context("pops an empty stack")
    }

    /// The objects pushed since the last `MARK`, which goes.
    fn pop_mark(&mut self) -> Result<Vec<Id>> {
        let mark = self.marks.pop().context("has no MARK to go back to")?;
        Ok(self.stack.split_off(mark))
    }

    /// `LONG1`: a little-endian two's-complement integer of up to 8 bytes.
    fn long1(&mut self) -> Result<()> {
        let len = usize::from(self.byte()?);
        anyhow::ensure!(len <= 8, "an integer of {len} bytes is larger than 64 bits");
        let bytes = self.bytes(len)?;
        let mut value = [0u8; 8];
        value[..len].copy_from_slice(bytes);
        if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
            value[len..].fill(0xff);
        }
        self.push_int(i64::from_le_bytes(value));
        Ok(())
    }

    fn string(&mut self, len: u64) -> Result<()> {
        let len = usize::try_from(len).context("a string longer than memory")?;
        let bytes = self.bytes(len)?;
        let text = std::str::from_utf8(bytes).context("a string that is not UTF-8")?;
        self.push(Object::Str(text.to_owned()));
        Ok(())
    }

    fn global(&mut self) -> Result<()> {
        let module = self.line()?;
        let name = self.line()?;
        self.push(Object::Global { module, name });
        Ok(())
    }

    fn stack_global(&mut self) -> Result<()> {
        let name = self.pop()?;
        let module = self.pop()?;
        let (Object::Str(module), Object::Str(name)) = (&self.objects[module], &self.objects[name])
        else {
            bail!("STACK_GLOBAL of something other than two strings");
        };
        let global = Object::Global {
            module: module.clone(),
            name: name.clone(),
        };
        self.push(global);
        Ok(())
    }

    fn tuple(&mut self, len: usize) -> Result<()> {
        let mut items = vec![0; len];
        for item in items.iter_mut().rev() {
            *item = self.pop()?;
        }
        self.push(Object::Tuple(items));
        Ok(())
    }

    fn extend_list(&mut self, items: Vec<Id>) -> Result<()> {
        let list = *self.stack.last().context("APPEND to an empty stack")?;
        match &mut self.objects[list] {
            Object::List(list) => list.extend(items),
            _ => bail!("APPEND to something other than a list"),
        }
        Ok(())
    }

    fn extend_dict(&mut self, pairs: Vec<(Id, Id)>) -> Result<()> {
        let dict = *self.stack.last().context("SETITEM on an empty stack")?;
        match &mut self.objects[dict] {
            Object::Dict(dict) => dict.extend(pairs),
            _ => bail!("SETITEM on something other than a dict"),
        }
        Ok(())
    }

    fn put(&mut self, key: u32) -> Result<()> {
        let top = *self.stack.last().context("memoizes an empty stack")?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn get(&mut self, key: u32) -> Result<()> {
        let id = *self
            .memo
            .get(&key)
            .with_context(|| format!("reads memo {key}, which was never written"))?;
        self.stack.push(id);
        Ok(())
    }

    /// `REDUCE`/`NEWOBJ`. `collections.OrderedDict()` is the one call made
    /// (an empty dict, for `SETITEMS` to fill: torch saves state dicts
    /// that way); any other call stays a record.
    fn call(&mut self) -> Result<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let ordered_dict = matches!(
            &self.objects[callable],
            Object::Global { module, name } if module == "collections" && name == "OrderedDict"
        );
        if ordered_dict {
            self.push(Object::Dict(Vec::new()));
        } else {
            self.push(Object::Call { callable, args });
        }
        Ok(())
    }
}

/// `[k1, v1, k2, v2, ...]` as pairs.
fn pairs(items: &[Id]) -> Result<Vec<(Id, Id)>> {
    anyhow::ensure!(
        items.len().is_multiple_of(2),
        "a dict of {} items, not key-value pairs",
        items.len()
    );
    Ok(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict_len(pickle: &Pickle) -> usize {
        match pickle.get(pickle.root()) {
            Object::Dict(items) => items.len(),
            other => panic!("{other:?}"),
        }
    }

    /// `pickle.dumps({"a": (1, -2, 300, 70000, 2**40)}, protocol=2)`.
    #[test]
    fn reads_what_python_writes() {
        let bytes = b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01(K\x01J\xfe\xff\xff\xffM,\x01Jp\x11\x01\x00\x8a\x06\x00\x00\x00\x00\x00\x01tq\x02s.";
        let pickle = Pickle::parse(bytes).unwrap();
        assert_eq!(dict_len(&pickle), 1);
        let Object::Dict(items) = pickle.get(pickle.root()) else {
            unreachable!()
        };
        let (key, value) = items[0];
        assert_eq!(pickle.as_str(key), Some("a"));
        let ints: Vec<i64> = pickle
            .as_tuple(value)
            .unwrap()
            .iter()
            .map(|&id| pickle.as_int(id).unwrap())
            .collect();
        assert_eq!(ints, [1, -2, 300, 70000, 1 << 40]);
    }

    /// A GLOBAL and a REDUCE are kept as records: nothing is imported or called.
    #[test]
    fn a_call_is_data() {
        let bytes = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.";
        let pickle = Pickle::parse(bytes).unwrap();
        let Object::Call { callable, .. } = pickle.get(pickle.root()) else {
            panic!("{:?}", pickle.get(pickle.root()))
        };
        assert_eq!(pickle.as_global(*callable), Some(("os", "system")));
    }

    /// A string claiming 4 GB in a 10-byte pickle is refused, not allocated.
    #[test]
    fn a_length_past_the_end_is_refused() {
        let err = Pickle::parse(b"\x80\x02X\xff\xff\xff\xffab.").unwrap_err();
        assert!(
            format!("{err:#}").contains("needs 4294967295 bytes"),
            "{err:#}"
        );
        let err = Pickle::parse(b"\x80\x02\x8a\x09\x01\x02.").unwrap_err();
        assert!(
            format!("{err:#}").contains("larger than 64 bits"),
            "{err:#}"
        );
    }

    /// A memo entry fetched twice per level, 64 levels deep, is 2^64
    /// objects to a reader that copies; here it is one object per opcode.
    #[test]
    fn the_memo_shares_instead_of_copying() {
        let mut bytes = b"\x80\x02)q\x00".to_vec();
        for _ in 0..64 {
            bytes.extend_from_slice(b"h\x00h\x00\x86q\x00");
        }
        bytes.push(b'.');
        let pickle = Pickle::parse(&bytes).unwrap();
        assert!(pickle.objects.len() <= 65);
    }

    /// A million nested tuples drop without recursion.
    #[test]
    fn deep_nesting_does_not_overflow_the_stack() {
        let mut bytes = b"\x80\x02N".to_vec();
        bytes.resize(bytes.len() + 1_000_000, 0x85);
        bytes.push(b'.');
        let pickle = Pickle::parse(&bytes).unwrap();
        assert_eq!(pickle.objects.len(), 1_000_001);
    }

    #[test]
    fn malformed_programs_are_errors() {
        for (bytes, reason) in [
            (&b"\x80\x02"[..], "where 0 remain"),
            (b"\x80\x02.", "empty stack"),
            (b"\x80\x02h\x05.", "never written"),
            (b"\x80\x02K\x01t.", "no MARK"),
            (b"\x80\x02N(\x85.", "past a MARK"),
            (b"\x80\x02K\x01K\x02s.", "empty stack"),
            (b"\x80\x02)K\x01K\x02s.", "other than a dict"),
            (b"\x80\x02}(K\x01u.", "key-value"),
            (b"\x80\x02cos\nsys", "past the end"),
            (b"\x80\x02I1\n.", "0x49"),
        ] {
            let err = Pickle::parse(bytes).unwrap_err();
            assert!(format!("{err:#}").contains(reason), "{bytes:?}: {err:#}");
        }
    }
}
