//! The device side of firmware-sim, usable on its own: sensor drivers written against the
//! embedded-hal 1.0 traits ([`drivers`]), a simulated I2C bus that answers as the sensors would
//! from a physical model with injectable faults ([`simbus`]), and the device firmware that reads
//! the sensors and builds the telemetry payload ([`firmware`]).

pub mod drivers;
pub mod firmware;
pub mod simbus;
