//! The serde side of the config loader, written once for every key: a deserializer that
//! reads one layer's entries (TOML values from the file, text from the environment or a flag)
//! into the derived [`Config`](super::Config), and ties each refusal to the key, the value as
//! given and its source. Nothing here names a key; what a key accepts is `super::rules`, which
//! the caller passes to [`DeError::into_config_error`].
use std::fmt;
use std::path::Path;

use serde::de::value::StringDeserializer;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess,
    Visitor,
};
use serde::forward_to_deserialize_any;

use super::{ConfigError, Source, ERROR_VALUE_BYTES_MAX, GIB, KIB, MIB, TIB};

/// The field names of a struct, or the variant names of an enum, as serde's derive spells
/// them: the derive hands them to the deserializer, and this one only writes them down.
pub(super) fn names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Names<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Names<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("names only"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            self.deserialize_any(visitor)
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = variants;
            self.deserialize_any(visitor)
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map identifier
            ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(Names(&mut names));
    names
}

/// A value as given: from the TOML file, or text from the environment or a flag.
pub(super) enum Raw {
    Toml(toml::Value),
    Text(String),
}

/// A borrowed [`Raw`], or a value inside a TOML table or array.
#[derive(Clone, Copy)]
pub(super) enum RawRef<'a> {
    Toml(&'a toml::Value),
    Text(&'a str),
}

impl RawRef<'_> {
    /// The value as quoted back in an error, bounded in length.
    pub(super) fn display(self) -> String {
        truncate(match self {
            RawRef::Text(text) => text.to_owned(),
            RawRef::Toml(value) => describe_toml(value),
        })
    }
}

/// One key set by one layer.
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) raw: Raw,
    pub(super) source: Source,
}

impl Entry {
    pub(super) fn new(key: String, raw: Raw, source: Source) -> Self {
        Self { key, raw, source }
    }

    pub(super) fn raw(&self) -> RawRef<'_> {
        match &self.raw {
            Raw::Toml(value) => RawRef::Toml(value),
            Raw::Text(text) => RawRef::Text(text),
        }
    }
}

/// A failure inside serde, and then (once the map that holds the value catches it) the
/// [`ConfigError`] naming its key, value and source.
#[derive(Debug)]
pub(super) enum DeError {
    /// serde refused a value; the message is not shown: the key's rule says what is allowed.
    Value(String),
    /// A key the struct lacks, with the keys it has.
    UnknownKey(String, &'static [&'static str]),
    /// A required key is absent.
    Missing(&'static str),
    /// Tied to its key.
    Located(Box<ConfigError>),
}

impl DeError {
    /// Ties the error to the value at `key`. What the key accepts is written in by
    /// [`DeError::into_config_error`]: this adapter knows no key's rule.
    fn at(self, key: &str, raw: RawRef<'_>, source: &Source, file: &Path) -> Self {
        let error = match self {
            Self::Located(error) => return Self::Located(error),
            Self::Missing(field) => ConfigError::MissingKey {
                key: format!("{key}.{field}"),
                path: file.to_path_buf(),
                expected: String::new(),
            },
            Self::Value(_) | Self::UnknownKey(..) => ConfigError::BadValue {
                key: key.to_owned(),
                value: raw.display(),
                source: source.clone(),
                expected: String::new(),
            },
        };
        Self::Located(Box::new(error))
    }

    /// The error for the operator, with `expected(key)` (the key's rule, from `rules.rs`) as
    /// what the key at fault accepts.
    pub(super) fn into_config_error(self, expected: fn(&str) -> String) -> ConfigError {
        match self {
            Self::Located(error) => match *error {
                ConfigError::MissingKey { key, path, .. } => ConfigError::MissingKey {
                    expected: expected(&key),
                    key,
                    path,
                },
                ConfigError::BadValue {
                    key, value, source, ..
                } => ConfigError::BadValue {
                    expected: expected(&key),
                    key,
                    value,
                    source,
                },
                other => other,
            },
            // Every value is read through `MapDe`, which locates its errors; keep the text if
            // serde ever fails elsewhere.
            other => ConfigError::Conflict {
                message: format!("configuration refused: {other}"),
            },
        }
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(message) => f.write_str(message),
            Self::UnknownKey(key, _) => write!(f, "unknown key `{key}`"),
            Self::Missing(key) => write!(f, "missing key `{key}`"),
            Self::Located(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Self::Value(message.to_string())
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self::UnknownKey(field.to_owned(), expected)
    }

    fn missing_field(field: &'static str) -> Self {
        Self::Missing(field)
    }
}

/// A table: the layer's entries at the top level, or a TOML table inside the file.
pub(super) struct MapDe<'a> {
    /// The table's key: empty at the top level, `namespaces.ac`, `tokens[0]`.
    path: String,
    items: std::vec::IntoIter<(&'a str, RawRef<'a>, &'a Source)>,
    /// The value whose key was just read, with its full key.
    value: Option<(String, RawRef<'a>, &'a Source)>,
    file: &'a Path,
}

impl<'a> MapDe<'a> {
    pub(super) fn new(
        path: String,
        items: Vec<(&'a str, RawRef<'a>, &'a Source)>,
        file: &'a Path,
    ) -> Self {
        let items = items.into_iter();
        Self {
            path,
            items,
            value: None,
            file,
        }
    }

    /// How an unknown-key message names this table.
    fn table_name(&self) -> String {
        let path = &self.path;
        match path
            .strip_prefix("tokens[")
            .and_then(|i| i.strip_suffix(']'))
        {
            _ if path.is_empty() => "the top level".to_owned(),
            Some(index) => format!("`[[tokens]]` entry {index}"),
            None => format!("table `[{path}]`"),
        }
    }
}

impl<'de> MapAccess<'de> for MapDe<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, raw, source)) = self.items.next() else {
            return Ok(None);
        };
        let full = match self.path.as_str() {
            "" => key.to_owned(),
            path => format!("{path}.{key}"),
        };
        self.value = Some((full, raw, source));
        let key_de: StringDeserializer<DeError> = key.to_owned().into_deserializer();
        seed.deserialize(key_de)
            .map(Some)
            .map_err(|error| match error {
                DeError::UnknownKey(key, allowed) => {
                    DeError::Located(Box::new(ConfigError::UnknownKey {
                        key,
                        table: self.table_name(),
                        path: self.file.to_path_buf(),
                        allowed: allowed.to_vec(),
                    }))
                }
                other => other,
            })
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let (key, raw, source) = self
            .value
            .take()
            .ok_or_else(|| DeError::Value("a value asked for before its key".to_owned()))?;
        let file = self.file;
        seed.deserialize(ValueDe {
            raw,
            key: key.clone(),
            source,
            file,
        })
        .map_err(|error| error.at(&key, raw, source, file))
    }
}

impl<'de> Deserializer<'de> for MapDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_map(self)
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// The items of a TOML array.
pub(super) struct SeqDe<'a> {
    path: String,
    items: std::iter::Enumerate<std::slice::Iter<'a, toml::Value>>,
    source: &'a Source,
    file: &'a Path,
}

impl<'de> SeqAccess<'de> for SeqDe<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some((index, item)) = self.items.next() else {
            return Ok(None);
        };
        let key = format!("{}[{index}]", self.path);
        let raw = RawRef::Toml(item);
        let (source, file) = (self.source, self.file);
        seed.deserialize(ValueDe {
            raw,
            key: key.clone(),
            source,
            file,
        })
        .map(Some)
        .map_err(|error| error.at(&key, raw, source, file))
    }
}

/// One value, typed the way the target field asks: a TOML value as TOML types it, env and
/// flag text as the module docs say (bools as words, numbers as decimal digits, keywords in
/// any case). Anything else is refused, and the enclosing map names the key.
pub(super) struct ValueDe<'a> {
    raw: RawRef<'a>,
    /// The value's full key, the path of its items if it is a table or array.
    key: String,
    source: &'a Source,
    file: &'a Path,
}

impl<'a> ValueDe<'a> {
    fn text(&self) -> Option<&'a str> {
        match self.raw {
            RawRef::Text(text) => Some(text.trim_ascii()),
            RawRef::Toml(toml::Value::String(text)) => Some(text),
            RawRef::Toml(_) => None,
        }
    }

    fn refuse<T>() -> Result<T, DeError> {
        Err(DeError::Value("refused".to_owned()))
    }
}

impl<'de> Deserializer<'de> for ValueDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let value = match self.raw {
            RawRef::Text(text) => return visitor.visit_str(text.trim_ascii()),
            RawRef::Toml(value) => value,
        };
        match value {
            toml::Value::String(text) => visitor.visit_str(text),
            toml::Value::Integer(n) => visitor.visit_i64(*n),
            toml::Value::Float(x) => visitor.visit_f64(*x),
            toml::Value::Boolean(b) => visitor.visit_bool(*b),
            // No key takes a date; as text it would pass for a path or a name.
            toml::Value::Datetime(_) => Self::refuse(),
            toml::Value::Array(items) => visitor.visit_seq(SeqDe {
                path: self.key,
                items: items.iter().enumerate(),
                source: self.source,
                file: self.file,
            }),
            toml::Value::Table(table) => {
                let items = table
                    .iter()
                    .map(|(k, v)| (k.as_str(), RawRef::Toml(v), self.source));
                visitor.visit_map(MapDe::new(self.key, items.collect(), self.file))
            }
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let RawRef::Text(text) = self.raw else {
            return self.deserialize_any(visitor);
        };
        match parse_bool(text.trim_ascii()) {
            Some(b) => visitor.visit_bool(b),
            None => Self::refuse(),
        }
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let RawRef::Text(text) = self.raw else {
            return self.deserialize_any(visitor);
        };
        match parse_digits(text.trim_ascii()) {
            Some(n) => visitor.visit_u64(n),
            None => Self::refuse(),
        }
    }

    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_u64(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        // TOML has no null: a value that is there is `Some`.
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        match self.text() {
            Some(text) => visitor.visit_enum(text.to_ascii_lowercase().into_deserializer()),
            None => Self::refuse(),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.raw {
            RawRef::Toml(toml::Value::Table(_)) => self.deserialize_any(visitor),
            _ => Self::refuse(),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        // Only a table: serde's derive would also take an array, by position.
        self.deserialize_map(visitor)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.raw {
            RawRef::Toml(toml::Value::Array(_)) => self.deserialize_any(visitor),
            _ => Self::refuse(),
        }
    }

    forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u128 f32 f64 char str string bytes byte_buf unit unit_struct tuple
        tuple_struct identifier ignored_any
    }
}

/// A byte count: a whole number, or a string with a size suffix (see the module docs). A
/// field opts in with `#[serde(deserialize_with = "bytes")]`.
pub(super) fn bytes<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    deserializer: D,
) -> Result<T, D::Error> {
    struct Bytes;
    impl Visitor<'_> for Bytes {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a byte count")
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n).map_err(|_| E::custom("negative byte count"))
        }
        fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
            parse_bytes(text).ok_or_else(|| E::custom("not a byte count"))
        }
    }
    let n = deserializer.deserialize_any(Bytes)?;
    T::try_from(n).map_err(|_| de::Error::custom("byte count too large"))
}

/// Describes a TOML value for an error message without serialising it (which could fail).
pub(super) fn describe_toml(value: &toml::Value) -> String {
    match value {
        toml::Value::String(text) => format!("{text:?}"),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(dt) => dt.to_string(),
        toml::Value::Array(items) => format!("an array of {} items", items.len()),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

pub(super) fn truncate(mut text: String) -> String {
    if text.len() > ERROR_VALUE_BYTES_MAX {
        let mut end = ERROR_VALUE_BYTES_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, ignoring case.
pub(super) fn parse_bool(text: &str) -> Option<bool> {
    let is = |words: [&str; 4]| words.iter().any(|word| text.eq_ignore_ascii_case(word));
    match (
        is(["true", "1", "yes", "on"]),
        is(["false", "0", "no", "off"]),
    ) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// Decimal digits only: no sign, no spaces, no `0x`; `None` on overflow.
pub(super) fn parse_digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A byte count: digits, then optionally spaces and a suffix (see the module docs).
pub(super) fn parse_bytes(text: &str) -> Option<u64> {
    let digits_end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    let number = parse_digits(&text[..digits_end])?;
    let suffix = text[digits_end..].trim_start_matches(' ');
    const SUFFIXES: &[(&str, u64)] = &[
        ("", 1),
        ("b", 1),
        ("kib", KIB),
        ("mib", MIB),
        ("gib", GIB),
        ("tib", TIB),
        ("kb", 1000),
        ("mb", 1000 * 1000),
        ("gb", 1000 * 1000 * 1000),
        ("tb", 1000 * 1000 * 1000 * 1000),
    ];
    let (_, unit) = SUFFIXES
        .iter()
        .find(|(name, _)| suffix.eq_ignore_ascii_case(name))?;
    number.checked_mul(*unit)
}
