//! A small QAPI: command arguments are described in QEMU's own schema
//! language (the `qapi/*.json` syntax, single quotes allowed) and checked
//! before any handler runs, with QEMU's error wording.
//!
//! Supported expressions: `struct` (with `base`), `enum`, `union` (flat,
//! with `base` and `discriminator`), `alternate`; `command`, `event`,
//! `include` and `pragma` are accepted and ignored by [`Schema::define`].
//! Members are `'name': TYPE` or `'*name': TYPE` (optional) or
//! `'name': {'type': TYPE, ...}`; a TYPE is a builtin (`str`, `int`,
//! `int8`..`int64`, `uint8`..`uint64`, `size`, `number`, `bool`, `null`,
//! `any`), a defined name, or `[TYPE]` for a list. Other keys (`if`,
//! `features`, `returns`, ...) are ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};

use crate::error::{Error, QmpError};
use crate::json::parse_all_lenient;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Builtin {
    Str,
    Int {
        min: i128,
        max: i128,
        name: &'static str,
    },
    Number,
    Bool,
    Null,
    Any,
}

fn builtin(name: &str) -> Option<Builtin> {
    let int = |min: i128, max: i128, name: &'static str| Some(Builtin::Int { min, max, name });
    match name {
        "str" => Some(Builtin::Str),
        "number" => Some(Builtin::Number),
        "bool" => Some(Builtin::Bool),
        "null" => Some(Builtin::Null),
        "any" => Some(Builtin::Any),
        "int" | "int64" => int(i64::MIN.into(), i64::MAX.into(), "int64"),
        "int8" => int(i8::MIN.into(), i8::MAX.into(), "int8"),
        "int16" => int(i16::MIN.into(), i16::MAX.into(), "int16"),
        "int32" => int(i32::MIN.into(), i32::MAX.into(), "int32"),
        "uint8" => int(0, u8::MAX.into(), "uint8"),
        "uint16" => int(0, u16::MAX.into(), "uint16"),
        "uint32" => int(0, u32::MAX.into(), "uint32"),
        "uint64" => int(0, u64::MAX.into(), "uint64"),
        "size" => int(0, u64::MAX.into(), "size"),
        _ => None,
    }
}

/// A reference to a type inside a member or a command's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TypeRef {
    Builtin(Builtin),
    Named(String),
    List(Box<TypeRef>),
}

#[derive(Debug, Clone)]
pub(crate) struct Member {
    name: String,
    optional: bool,
    ty: TypeRef,
}

#[derive(Debug, Clone)]
pub(crate) enum TypeDef {
    Struct {
        base: Option<String>,
        members: Vec<Member>,
    },
    Enum(Vec<String>),
    Union {
        base: Vec<Member>,
        base_name: Option<String>,
        discriminator: String,
        variants: BTreeMap<String, String>,
    },
    Alternate(Vec<(String, TypeRef)>),
}

/// A set of named QAPI types (structs, enums, unions, alternates).
#[derive(Debug, Default, Clone)]
pub struct Schema {
    types: HashMap<String, TypeDef>,
}

fn as_str<'a>(v: Option<&'a Value>, ctx: &str, key: &str) -> Result<&'a str, Error> {
    v.and_then(Value::as_str)
        .ok_or_else(|| Error::schema(ctx, format!("'{key}' must be a string")))
}

pub(crate) fn parse_typeref(ctx: &str, v: &Value) -> Result<TypeRef, Error> {
    match v {
        Value::String(s) => Ok(builtin(s)
            .map(TypeRef::Builtin)
            .unwrap_or_else(|| TypeRef::Named(s.clone()))),
        Value::Array(a) if a.len() == 1 => Ok(TypeRef::List(Box::new(parse_typeref(ctx, &a[0])?))),
        Value::Object(o) => match o.get("type") {
            Some(t) => parse_typeref(ctx, t),
            None => Err(Error::schema(ctx, "member definition lacks 'type'")),
        },
        _ => Err(Error::schema(ctx, format!("bad type reference {v}"))),
    }
}

pub(crate) fn parse_members(ctx: &str, v: &Value) -> Result<Vec<Member>, Error> {
    let obj = v
        .as_object()
        .ok_or_else(|| Error::schema(ctx, "'data' must be an object of members"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (k, t) in obj {
        let (name, optional) = match k.strip_prefix('*') {
            Some(n) => (n.to_string(), true),
            None => (k.clone(), false),
        };
        out.push(Member {
            name,
            optional,
            ty: parse_typeref(ctx, t)?,
        });
    }
    Ok(out)
}

/// Where in the arguments a value sits, for messages: `a.b[2].c`.
#[derive(Debug, Default)]
pub(crate) struct Path(Vec<Seg>);

#[derive(Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Path {
    fn render(&self) -> String {
        if self.0.is_empty() {
            return "null".to_string();
        }
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        s
    }

    fn with_key(&self, k: &str) -> String {
        if self.0.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.render())
        }
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl Schema {
    /// An empty schema.
    pub fn new() -> Self {
        Self::default()
    }

    /// True if a type of this name is defined.
    pub fn contains(&self, name: &str) -> bool {
        self.types.contains_key(name)
    }

    /// Adds every type defined in `text`: one or more QAPI expressions,
    /// e.g. `{'enum': 'Mode', 'data': ['primary', 'secondary']}`.
    /// Comment lines starting with `#` are ignored. References are checked
    /// once the whole text is read, so a text may refer forward.
    pub fn define(&mut self, text: &str) -> Result<(), Error> {
        let stripped: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let exprs = parse_all_lenient(&stripped).map_err(|e| Error::schema("<schema text>", e))?;
        let mut added = Vec::new();
        for e in &exprs {
            let obj = e
                .as_object()
                .ok_or_else(|| Error::schema("<schema text>", "expression must be an object"))?;
            if let Some((name, def)) = self.parse_expr(obj)? {
                if self.types.contains_key(&name) || builtin(&name).is_some() {
                    return Err(Error::schema(&name, "type is defined twice"));
                }
                self.types.insert(name.clone(), def);
                added.push(name);
            }
        }
        for name in &added {
            if let Err(e) = self.check_def(name) {
                for n in &added {
                    self.types.remove(n);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub(crate) fn insert_anonymous(
        &mut self,
        name: &str,
        members: Vec<Member>,
    ) -> Result<(), Error> {
        self.types.insert(
            name.to_string(),
            TypeDef::Struct {
                base: None,
                members,
            },
        );
        self.check_def(name).inspect_err(|_| {
            self.types.remove(name);
        })
    }

    fn parse_expr(&self, obj: &Map<String, Value>) -> Result<Option<(String, TypeDef)>, Error> {
        if let Some(n) = obj.get("struct") {
            let name = as_str(Some(n), "<struct>", "struct")?.to_string();
            let members = match obj.get("data") {
                Some(d) => parse_members(&name, d)?,
                None => Vec::new(),
            };
            let base = match obj.get("base") {
                Some(b) => Some(as_str(Some(b), &name, "base")?.to_string()),
                None => None,
            };
            return Ok(Some((name, TypeDef::Struct { base, members })));
        }
        if let Some(n) = obj.get("enum") {
            let name = as_str(Some(n), "<enum>", "enum")?.to_string();
            let data = obj
                .get("data")
                .and_then(Value::as_array)
                .ok_or_else(|| Error::schema(&name, "enum 'data' must be a list"))?;
            let mut values = Vec::new();
            for v in data {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Object(o) => as_str(o.get("name"), &name, "name")?.to_string(),
                    _ => return Err(Error::schema(&name, "bad enum value")),
                };
                values.push(s);
            }
            return Ok(Some((name, TypeDef::Enum(values))));
        }
        if let Some(n) = obj.get("union") {
            let name = as_str(Some(n), "<union>", "union")?.to_string();
            let (base, base_name) = match obj.get("base") {
                Some(Value::String(b)) => (Vec::new(), Some(b.clone())),
                Some(b @ Value::Object(_)) => (parse_members(&name, b)?, None),
                _ => return Err(Error::schema(&name, "union needs a 'base'")),
            };
            let discriminator =
                as_str(obj.get("discriminator"), &name, "discriminator")?.to_string();
            let mut variants = BTreeMap::new();
            if let Some(d) = obj.get("data") {
                let d = d
                    .as_object()
                    .ok_or_else(|| Error::schema(&name, "union 'data' must be an object"))?;
                for (k, v) in d {
                    match parse_typeref(&name, v)? {
                        TypeRef::Named(t) => {
                            variants.insert(k.clone(), t);
                        }
                        _ => {
                            return Err(Error::schema(
                                &name,
                                format!("variant '{k}' must name a struct"),
                            ))
                        }
                    }
                }
            }
            return Ok(Some((
                name,
                TypeDef::Union {
                    base,
                    base_name,
                    discriminator,
                    variants,
                },
            )));
        }
        if let Some(n) = obj.get("alternate") {
            let name = as_str(Some(n), "<alternate>", "alternate")?.to_string();
            let d = obj
                .get("data")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::schema(&name, "alternate 'data' must be an object"))?;
            let mut branches = Vec::new();
            for (k, v) in d {
                branches.push((k.clone(), parse_typeref(&name, v)?));
            }
            return Ok(Some((name, TypeDef::Alternate(branches))));
        }
        for ignored in ["command", "event", "include", "pragma"] {
            if obj.contains_key(ignored) {
                return Ok(None);
            }
        }
        Err(Error::schema(
            "<schema text>",
            "expression is none of struct, enum, union, alternate, command, event",
        ))
    }

    pub(crate) fn check_ref(&self, ctx: &str, t: &TypeRef) -> Result<(), Error> {
        match t {
            TypeRef::Builtin(_) => Ok(()),
            TypeRef::List(inner) => self.check_ref(ctx, inner),
            TypeRef::Named(n) => {
                if self.types.contains_key(n) {
                    Ok(())
                } else {
                    Err(Error::schema(ctx, format!("unknown type '{n}'")))
                }
            }
        }
    }

    fn struct_members(&self, name: &str) -> Option<Vec<&Member>> {
        let mut chain = Vec::new();
        let mut cur = name;
        // A base chain longer than the number of types is a cycle.
        for _ in 0..=self.types.len() {
            match self.types.get(cur)? {
                TypeDef::Struct { base, members } => {
                    chain.push(members);
                    match base {
                        Some(b) => cur = b,
                        None => {
                            return Some(chain.into_iter().rev().flatten().collect());
                        }
                    }
                }
                _ => return None,
            }
        }
        None
    }

    fn check_def(&self, name: &str) -> Result<(), Error> {
        match &self.types[name] {
            TypeDef::Struct { base, members } => {
                if let Some(b) = base {
                    if self.struct_members(b).is_none() {
                        return Err(Error::schema(
                            name,
                            format!("base '{b}' is not a struct (or is cyclic)"),
                        ));
                    }
                }
                for m in members {
                    self.check_ref(name, &m.ty)?;
                }
                Ok(())
            }
            TypeDef::Enum(values) => {
                let set: BTreeSet<_> = values.iter().collect();
                if set.len() != values.len() {
                    return Err(Error::schema(name, "enum value repeated"));
                }
                Ok(())
            }
            TypeDef::Union {
                base,
                base_name,
                discriminator,
                variants,
            } => {
                let base_members: Vec<&Member> = match base_name {
                    Some(b) => self.struct_members(b).ok_or_else(|| {
                        Error::schema(name, format!("base '{b}' is not a struct"))
                    })?,
                    None => base.iter().collect(),
                };
                for m in &base_members {
                    self.check_ref(name, &m.ty)?;
                }
                let disc = base_members
                    .iter()
                    .find(|m| &m.name == discriminator && !m.optional)
                    .ok_or_else(|| {
                        Error::schema(
                            name,
                            format!(
                                "discriminator '{discriminator}' is not a required base member"
                            ),
                        )
                    })?;
                let values = match &disc.ty {
                    TypeRef::Named(e) => match self.types.get(e) {
                        Some(TypeDef::Enum(v)) => v,
                        _ => return Err(Error::schema(name, "discriminator must be an enum")),
                    },
                    _ => return Err(Error::schema(name, "discriminator must be an enum")),
                };
                for (k, s) in variants {
                    if !values.contains(k) {
                        return Err(Error::schema(
                            name,
                            format!("variant '{k}' is not a value of the discriminator"),
                        ));
                    }
                    if self.struct_members(s).is_none() {
                        return Err(Error::schema(
                            name,
                            format!("variant '{k}' names '{s}', not a struct"),
                        ));
                    }
                }
                Ok(())
            }
            TypeDef::Alternate(branches) => {
                for (_, t) in branches {
                    self.check_ref(name, t)?;
                }
                Ok(())
            }
        }
    }

    /// Checks `value` against `ty`; the first error is returned, worded as
    /// QEMU's input visitor words it.
    pub(crate) fn check(&self, ty: &TypeRef, v: &Value, path: &mut Path) -> Result<(), QmpError> {
        match ty {
            TypeRef::Builtin(b) => check_builtin(*b, v, path),
            TypeRef::List(inner) => {
                let a = v
                    .as_array()
                    .ok_or_else(|| QmpError::invalid_type(&path.render(), "array"))?;
                for (i, e) in a.iter().enumerate() {
                    path.0.push(Seg::Index(i));
                    let r = self.check(inner, e, path);
                    path.0.pop();
                    r?;
                }
                Ok(())
            }
            TypeRef::Named(n) => self.check_named(n, v, path),
        }
    }

    fn check_named(&self, name: &str, v: &Value, path: &mut Path) -> Result<(), QmpError> {
        let Some(def) = self.types.get(name) else {
            return Err(QmpError::generic(format!(
                "internal error: unknown type '{name}'"
            )));
        };
        match def {
            TypeDef::Enum(values) => {
                let s = v
                    .as_str()
                    .ok_or_else(|| QmpError::invalid_type(&path.render(), "string"))?;
                if values.iter().any(|x| x == s) {
                    Ok(())
                } else {
                    Err(QmpError::generic(format!(
                        "Parameter '{}' does not accept value '{s}'",
                        path.render()
                    )))
                }
            }
            TypeDef::Struct { .. } => {
                let obj = v
                    .as_object()
                    .ok_or_else(|| QmpError::invalid_type(&path.render(), "object"))?;
                let members = self.struct_members(name).unwrap_or_default();
                self.check_members(&members, obj, path)?;
                check_unexpected(obj, &members, path)
            }
            TypeDef::Union {
                base,
                base_name,
                discriminator,
                variants,
            } => {
                let obj = v
                    .as_object()
                    .ok_or_else(|| QmpError::invalid_type(&path.render(), "object"))?;
                let mut members: Vec<&Member> = match base_name {
                    Some(b) => self.struct_members(b).unwrap_or_default(),
                    None => base.iter().collect(),
                };
                self.check_members(&members, obj, path)?;
                let disc = obj.get(discriminator).and_then(Value::as_str).unwrap_or("");
                if let Some(s) = variants.get(disc) {
                    let vm = self.struct_members(s).unwrap_or_default();
                    self.check_members(&vm, obj, path)?;
                    members.extend(vm);
                }
                check_unexpected(obj, &members, path)
            }
            TypeDef::Alternate(branches) => {
                let pick = branches.iter().find(|(_, t)| self.alternate_fits(t, v));
                match pick {
                    Some((_, t)) => self.check(t, v, path),
                    None => Err(QmpError::invalid_type(&path.render(), name)),
                }
            }
        }
    }

    fn alternate_fits(&self, t: &TypeRef, v: &Value) -> bool {
        match (t, v) {
            (TypeRef::Builtin(Builtin::Any), _) => true,
            (TypeRef::Builtin(Builtin::Str), Value::String(_)) => true,
            (TypeRef::Builtin(Builtin::Int { .. } | Builtin::Number), Value::Number(_)) => true,
            (TypeRef::Builtin(Builtin::Bool), Value::Bool(_)) => true,
            (TypeRef::Builtin(Builtin::Null), Value::Null) => true,
            (TypeRef::List(_), Value::Array(_)) => true,
            (TypeRef::Named(n), v) => matches!(
                (self.types.get(n), v),
                (Some(TypeDef::Enum(_)), Value::String(_))
                    | (
                        Some(TypeDef::Struct { .. } | TypeDef::Union { .. }),
                        Value::Object(_)
                    )
            ),
            _ => false,
        }
    }

    fn check_members(
        &self,
        members: &[&Member],
        obj: &Map<String, Value>,
        path: &mut Path,
    ) -> Result<(), QmpError> {
        for m in members {
            match obj.get(&m.name) {
                None if m.optional => {}
                None => return Err(QmpError::missing(&path.with_key(&m.name))),
                Some(v) => {
                    path.0.push(Seg::Key(m.name.clone()));
                    let r = self.check(&m.ty, v, path);
                    path.0.pop();
                    r?;
                }
            }
        }
        Ok(())
    }
}

fn check_unexpected(
    obj: &Map<String, Value>,
    members: &[&Member],
    path: &Path,
) -> Result<(), QmpError> {
    for k in obj.keys() {
        if !members.iter().any(|m| &m.name == k) {
            return Err(QmpError::unexpected(&path.with_key(k)));
        }
    }
    Ok(())
}

fn check_builtin(b: Builtin, v: &Value, path: &Path) -> Result<(), QmpError> {
    let ok = match b {
        Builtin::Any => true,
        Builtin::Str => v.is_string(),
        Builtin::Bool => v.is_boolean(),
        Builtin::Null => v.is_null(),
        Builtin::Number => v.is_number(),
        Builtin::Int { min, max, name } => {
            let n: Option<i128> = v
                .as_i64()
                .map(i128::from)
                .or_else(|| v.as_u64().map(i128::from));
            match n {
                Some(n) if n >= min && n <= max => true,
                Some(_) => return Err(QmpError::invalid_value(&path.render(), name)),
                None => false,
            }
        }
    };
    if ok {
        return Ok(());
    }
    let expected = match b {
        Builtin::Str => "string",
        Builtin::Bool => "boolean",
        Builtin::Null => "null",
        Builtin::Number => "number",
        Builtin::Int { .. } => "integer",
        Builtin::Any => kind_name(v),
    };
    Err(QmpError::invalid_type(&path.render(), expected))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        let mut s = Schema::new();
        s.define(
            r#"
            # comments are fine
            { 'enum': 'Driver', 'data': ['file', 'null-co', {'name': 'qcow2'}] }
            { 'struct': 'Common', 'data': {'driver': 'Driver', '*node-name': 'str'} }
            { 'struct': 'FileOpts', 'data': {'filename': 'str', '*size': 'size'} }
            { 'struct': 'NullOpts', 'data': {'*size': 'int'} }
            { 'struct': 'QcowOpts', 'data': {'file': 'Ref', '*backing': 'Ref'} }
            { 'union': 'Options', 'base': 'Common', 'discriminator': 'driver',
              'data': {'file': 'FileOpts', 'null-co': 'NullOpts', 'qcow2': 'QcowOpts'} }
            { 'alternate': 'Ref', 'data': {'definition': 'Options', 'reference': 'str'} }
            { 'struct': 'Lists', 'data': {'items': ['Common'], '*n': 'uint8', '*f': 'number', '*b': 'bool', '*a': 'any'} }
            { 'command': 'ignored', 'data': {'x': 'str'} }
            "#,
        )
        .unwrap();
        s
    }

    fn check(s: &Schema, ty: &str, v: Value) -> Result<(), String> {
        s.check(&TypeRef::Named(ty.to_string()), &v, &mut Path::default())
            .map_err(|e| e.desc)
    }

    #[test]
    fn union_and_alternate() {
        let s = schema();
        assert_eq!(
            check(&s, "Options", json!({"driver": "file", "filename": "/x"})),
            Ok(())
        );
        assert_eq!(
            check(
                &s,
                "Options",
                json!({"driver": "qcow2", "file": {"driver": "file", "filename": "/x"}, "backing": "n1"})
            ),
            Ok(())
        );
        assert_eq!(
            check(
                &s,
                "Options",
                json!({"driver": "qcow2", "file": {"driver": "file"}})
            ),
            Err("Parameter 'file.filename' is missing".into())
        );
        assert_eq!(
            check(&s, "Options", json!({"driver": "qcow2", "file": 5})),
            Err("Invalid parameter type for 'file', expected: Ref".into())
        );
        assert_eq!(
            check(&s, "Options", json!({"driver": "nope"})),
            Err("Parameter 'driver' does not accept value 'nope'".into())
        );
        assert_eq!(
            check(&s, "Options", json!({"filename": "x"})),
            Err("Parameter 'driver' is missing".into())
        );
        assert_eq!(
            check(
                &s,
                "Options",
                json!({"driver": "file", "filename": "/x", "bogus": 1})
            ),
            Err("Parameter 'bogus' is unexpected".into())
        );
        assert_eq!(
            check(
                &s,
                "Options",
                json!({"driver": "null-co", "filename": "/x"})
            ),
            Err("Parameter 'filename' is unexpected".into())
        );
        assert_eq!(
            check(&s, "Options", json!({"driver": "file", "filename": 3})),
            Err("Invalid parameter type for 'filename', expected: string".into())
        );
        assert_eq!(
            check(
                &s,
                "Options",
                json!({"driver": "file", "filename": "x", "size": -1})
            ),
            Err("Parameter 'size' expects size".into())
        );
    }

    #[test]
    fn lists_and_scalars() {
        let s = schema();
        assert_eq!(check(&s, "Lists", json!({"items": []})), Ok(()));
        assert_eq!(
            check(
                &s,
                "Lists",
                json!({"items": [{"driver": "file"}, {"driver": "x"}]})
            ),
            Err("Parameter 'items[1].driver' does not accept value 'x'".into())
        );
        assert_eq!(
            check(&s, "Lists", json!({"items": {}})),
            Err("Invalid parameter type for 'items', expected: array".into())
        );
        assert_eq!(
            check(&s, "Lists", json!({"items": [], "n": 256})),
            Err("Parameter 'n' expects uint8".into())
        );
        assert_eq!(
            check(&s, "Lists", json!({"items": [], "n": 1.5})),
            Err("Invalid parameter type for 'n', expected: integer".into())
        );
        assert_eq!(
            check(&s, "Lists", json!({"items": [], "f": "1"})),
            Err("Invalid parameter type for 'f', expected: number".into())
        );
        assert_eq!(
            check(&s, "Lists", json!({"items": [], "f": 1, "a": [null]})),
            Ok(())
        );
        assert_eq!(
            check(&s, "Lists", json!({"items": [], "b": 1})),
            Err("Invalid parameter type for 'b', expected: boolean".into())
        );
        assert_eq!(
            check(&s, "Lists", json!([])),
            Err("Invalid parameter type for 'null', expected: object".into())
        );
    }

    #[test]
    fn bad_definitions_are_refused() {
        let mut s = schema();
        let e = s
            .define("{'struct': 'X', 'data': {'a': 'Nope'}}")
            .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Schema);
        assert!(!s.contains("X"));
        assert!(s.define("{'struct': 'Common', 'data': {}}").is_err());
        assert!(s
            .define("{'union': 'U', 'base': {'k': 'str'}, 'discriminator': 'k', 'data': {}}")
            .is_err());
        assert!(s
            .define("{'struct': 'A', 'base': 'B'} {'struct': 'B', 'base': 'A'}")
            .is_err());
        assert!(s.define("{'struct': ").is_err());
    }
}
