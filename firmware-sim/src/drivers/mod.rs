//! Sensor drivers written against the embedded-hal 1.0 traits: the same code reads a simulated
//! bus ([`crate::simbus`]) or, with the `hardware` feature, a real `/dev/i2c-N`.

pub mod bmp280;
pub mod sht3x;
