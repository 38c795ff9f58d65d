//! Declarative macros for XDR structs, enums and discriminated unions.

/// Declares a struct whose fields are encoded in order (RFC 4506 section
/// 4.14). Decoding errors name the field.
///
/// ```
/// xdr_wipe::xdr_struct! {
///     #[derive(Debug, PartialEq)]
///     pub struct Point { pub x: i32, pub y: i32 }
/// }
/// let p: Point = xdr_wipe::decode(&[0, 0, 0, 1, 255, 255, 255, 255]).unwrap();
/// assert_eq!(p, Point { x: 1, y: -1 });
/// ```
#[macro_export]
macro_rules! xdr_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$fmeta:meta])* $fvis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis struct $name {
            $( $(#[$fmeta])* $fvis $field: $ty ),*
        }

        impl $crate::Codec for $name {
            const MIN_ENCODED_LEN: usize = 0 $( + <$ty as $crate::Codec>::MIN_ENCODED_LEN )*;
            fn encoded_len(&self) -> usize {
                0 $( + $crate::Codec::encoded_len(&self.$field) )*
            }
            fn encode(&self, w: &mut $crate::Writer) {
                $( $crate::Codec::encode(&self.$field, w); )*
            }
            fn decode(r: &mut $crate::Reader<'_>) -> ::core::result::Result<Self, $crate::Error> {
                Ok(Self {
                    $( $field: r.field(stringify!($field), <$ty as $crate::Codec>::decode)?, )*
                })
            }
        }
    };
}

/// Declares an XDR enum (RFC 4506 section 4.3): a signed 32-bit value of
/// which only the declared ones decode.
///
/// ```
/// xdr_wipe::xdr_enum! {
///     pub enum Colour { Red = 1, Green = 2 }
/// }
/// assert_eq!(xdr_wipe::decode::<Colour>(&[0, 0, 0, 2]).unwrap(), Colour::Green);
/// assert!(xdr_wipe::decode::<Colour>(&[0, 0, 0, 3]).is_err());
/// ```
#[macro_export]
macro_rules! xdr_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(i32)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $value ),+
        }

        impl $name {
            /// Every declared value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The value on the wire.
            pub fn to_i32(self) -> i32 {
                self as i32
            }

            /// The variant with this value, if one is declared.
            pub fn from_i32(value: i32) -> ::core::option::Option<Self> {
                match value {
                    $( $value => Some(Self::$variant), )+
                    _ => None,
                }
            }
        }

        impl $crate::Codec for $name {
            fn encoded_len(&self) -> usize {
                4
            }
            fn encode(&self, w: &mut $crate::Writer) {
                w.put_u32(self.to_i32() as u32);
            }
            fn decode(r: &mut $crate::Reader<'_>) -> ::core::result::Result<Self, $crate::Error> {
                let at = r.offset();
                let value = r.read_u32()? as i32;
                Self::from_i32(value).ok_or_else(|| {
                    r.error_at(at, $crate::ErrorKind::InvalidEnum {
                        type_name: stringify!($name),
                        value,
                    })
                })
            }
        }
    };
}

/// Declares a discriminated union (RFC 4506 section 4.15) switched on a
/// signed 32-bit discriminant: `void` arms carry nothing, the others one
/// XDR value. An undeclared discriminant is refused.
///
/// ```
/// xdr_wipe::xdr_union! {
///     #[derive(Debug, PartialEq)]
///     pub enum Reply {
///         void { Nothing = 0 }
///         arms { Number(u32) = 1 }
///     }
/// }
/// assert_eq!(xdr_wipe::decode::<Reply>(&[0, 0, 0, 1, 0, 0, 0, 7]).unwrap(), Reply::Number(7));
/// assert_eq!(xdr_wipe::decode::<Reply>(&[0, 0, 0, 0]).unwrap(), Reply::Nothing);
/// ```
#[macro_export]
macro_rules! xdr_union {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            void { $( $(#[$vvmeta:meta])* $void:ident = $vvalue:literal ),* $(,)? }
            arms { $( $(#[$ameta:meta])* $arm:ident ( $ty:ty ) = $avalue:literal ),* $(,)? }
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vvmeta])* $void, )*
            $( $(#[$ameta])* $arm($ty), )*
        }

        impl $name {
            /// The discriminant of this arm.
            pub fn discriminant(&self) -> i32 {
                match self {
                    $( Self::$void => $vvalue, )*
                    $( Self::$arm(_) => $avalue, )*
                }
            }
        }

        impl $crate::Codec for $name {
            fn encoded_len(&self) -> usize {
                4 + match self {
                    $( Self::$void => 0, )*
                    $( Self::$arm(v) => $crate::Codec::encoded_len(v), )*
                }
            }
            fn encode(&self, w: &mut $crate::Writer) {
                w.put_u32(self.discriminant() as u32);
                match self {
                    $( Self::$void => {} )*
                    $( Self::$arm(v) => $crate::Codec::encode(v, w), )*
                }
            }
            fn decode(r: &mut $crate::Reader<'_>) -> ::core::result::Result<Self, $crate::Error> {
                let at = r.offset();
                let value = r.read_u32()? as i32;
                match value {
                    $( $vvalue => Ok(Self::$void), )*
                    $( $avalue => Ok(Self::$arm(r.field(stringify!($arm), <$ty as $crate::Codec>::decode)?)), )*
                    _ => Err(r.error_at(at, $crate::ErrorKind::InvalidUnionArm {
                        type_name: stringify!($name),
                        value,
                    })),
                }
            }
        }
    };
}
