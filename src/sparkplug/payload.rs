//! The Sparkplug B payload (`sparkplug_b.proto` of the Sparkplug 3.0 specification), as
//! hand-written prost messages: no build script, no `protoc`, so cross builds need
//! nothing beyond cargo.
//!
//! Invariants:
//! - Field numbers and wire types are the specification's (`org.eclipse.tahu.protobuf`,
//!   proto2); a field this edge node never sends (data sets, templates, metadata,
//!   extensions) is left out, and prost skips it when it decodes one.
//! - Every integer metric travels as the specification says: Int8/16/32 and UInt8/16/32
//!   in `int_value` (signed ones as two's complement), Int64/UInt64 in `long_value`.

/// `Payload`: one Sparkplug message body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Payload {
    /// Milliseconds since the Unix epoch (UTC) when the message was made.
    #[prost(uint64, optional, tag = "1")]
    pub timestamp: Option<u64>,
    #[prost(message, repeated, tag = "2")]
    pub metrics: Vec<Metric>,
    /// 0..=255, on every message but NDEATH.
    #[prost(uint64, optional, tag = "3")]
    pub seq: Option<u64>,
    #[prost(string, optional, tag = "4")]
    pub uuid: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    pub body: Option<Vec<u8>>,
}

/// `Payload.Metric`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Metric {
    /// Required in births; left out of data and commands once an alias was born.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(uint64, optional, tag = "2")]
    pub alias: Option<u64>,
    /// Milliseconds since the Unix epoch (UTC) of the value.
    #[prost(uint64, optional, tag = "3")]
    pub timestamp: Option<u64>,
    /// One of [`datatype`]; required in births.
    #[prost(uint32, optional, tag = "4")]
    pub datatype: Option<u32>,
    #[prost(bool, optional, tag = "5")]
    pub is_historical: Option<bool>,
    #[prost(bool, optional, tag = "6")]
    pub is_transient: Option<bool>,
    #[prost(bool, optional, tag = "7")]
    pub is_null: Option<bool>,
    #[prost(message, optional, tag = "9")]
    pub properties: Option<PropertySet>,
    #[prost(oneof = "Value", tags = "10, 11, 12, 13, 14, 15")]
    pub value: Option<Value>,
}

/// The value of a metric (`Payload.Metric.value`, without data sets and templates).
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(uint32, tag = "10")]
    IntValue(u32),
    #[prost(uint64, tag = "11")]
    LongValue(u64),
    #[prost(float, tag = "12")]
    FloatValue(f32),
    #[prost(double, tag = "13")]
    DoubleValue(f64),
    #[prost(bool, tag = "14")]
    BooleanValue(bool),
    #[prost(string, tag = "15")]
    StringValue(String),
}

/// `Payload.PropertySet`: parallel lists of keys and values.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertySet {
    #[prost(string, repeated, tag = "1")]
    pub keys: Vec<String>,
    #[prost(message, repeated, tag = "2")]
    pub values: Vec<PropertyValue>,
}

/// `Payload.PropertyValue` (without nested property sets).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PropertyValue {
    /// One of [`datatype`].
    #[prost(uint32, optional, tag = "1")]
    pub r#type: Option<u32>,
    #[prost(bool, optional, tag = "2")]
    pub is_null: Option<bool>,
    #[prost(oneof = "PropertyKind", tags = "3, 4, 5, 6, 7, 8")]
    pub value: Option<PropertyKind>,
}

/// The value of a property.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PropertyKind {
    #[prost(uint32, tag = "3")]
    IntValue(u32),
    #[prost(uint64, tag = "4")]
    LongValue(u64),
    #[prost(float, tag = "5")]
    FloatValue(f32),
    #[prost(double, tag = "6")]
    DoubleValue(f64),
    #[prost(bool, tag = "7")]
    BooleanValue(bool),
    #[prost(string, tag = "8")]
    StringValue(String),
}

/// The specification's `DataType` numbers this edge node uses.
pub mod datatype {
    pub const INT16: u32 = 2;
    pub const INT32: u32 = 3;
    pub const INT64: u32 = 4;
    pub const UINT16: u32 = 6;
    pub const UINT32: u32 = 7;
    pub const UINT64: u32 = 8;
    pub const FLOAT: u32 = 9;
    pub const DOUBLE: u32 = 10;
    pub const BOOLEAN: u32 = 11;
    pub const STRING: u32 = 12;
}

impl PropertySet {
    /// Appends a string property.
    pub fn push_string(&mut self, key: &str, value: &str) {
        self.keys.push(key.to_owned());
        self.values.push(PropertyValue {
            r#type: Some(datatype::STRING),
            is_null: None,
            value: Some(PropertyKind::StringValue(value.to_owned())),
        });
    }

    /// Appends an Int32 property.
    pub fn push_int32(&mut self, key: &str, value: i32) {
        self.keys.push(key.to_owned());
        self.values.push(PropertyValue {
            r#type: Some(datatype::INT32),
            is_null: None,
            value: Some(PropertyKind::IntValue(value as u32)),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// Bytes a reference encoder (protobuf's Python runtime with the specification's
    /// `sparkplug_b.proto`) writes for `timestamp=1, seq=2, metrics=[{name:"a", alias:3,
    /// datatype:Int32, int_value:4294967295}]`: the field numbers are the schema's.
    const REFERENCE: &[u8] = &[
        0x08, 0x01, 0x12, 0x0d, 0x0a, 0x01, 0x61, 0x10, 0x03, 0x20, 0x03, 0x50, 0xff, 0xff, 0xff,
        0xff, 0x0f, 0x18, 0x02,
    ];

    #[test]
    fn a_payload_has_the_wire_form_of_the_schema() {
        let payload = Payload {
            timestamp: Some(1),
            metrics: vec![Metric {
                name: Some("a".into()),
                alias: Some(3),
                datatype: Some(datatype::INT32),
                value: Some(Value::IntValue(u32::MAX)),
                ..Metric::default()
            }],
            seq: Some(2),
            ..Payload::default()
        };
        assert_eq!(payload.encode_to_vec(), REFERENCE);
        assert_eq!(Payload::decode(REFERENCE).expect("decodes"), payload);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [&[0xff_u8][..], &[0x12, 0x7f], &[0x0a]] {
            assert!(Payload::decode(bytes).is_err(), "{bytes:?}");
        }
        assert_eq!(Payload::decode(&[][..]).expect("empty"), Payload::default());
    }
}
