//! Sensirion SHT3x (SHT30/31/35) temperature and humidity sensor over I2C, written against the
//! embedded-hal 1.0 traits, following the datasheet ("Datasheet SHT3x-DIS", v7):
//! single-shot measurement with high repeatability and no clock stretching (command 0x2400),
//! a 6-byte read (temperature MSB, LSB, CRC, humidity MSB, LSB, CRC), CRC-8 with polynomial
//! 0x31 and init 0xFF, T = -45 + 175 * S_T / 65535 °C and RH = 100 * S_RH / 65535 %.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// I2C address with ADDR pin low (0x45 with it high).
pub const DEFAULT_ADDRESS: u8 = 0x44;
/// Single shot, high repeatability, clock stretching disabled.
pub const CMD_MEASURE_HIGH: [u8; 2] = [0x24, 0x00];
/// Soft reset.
pub const CMD_SOFT_RESET: [u8; 2] = [0x30, 0xA2];
/// Datasheet: high-repeatability measurement takes at most 15.5 ms.
pub const MEASUREMENT_US: u32 = 15_500;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub temperature_c: f32,
    pub humidity_pct: f32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus failed (e.g. no acknowledge: sensor missing or busy).
    I2c(E),
    /// A word's CRC did not match: the reading is not to be trusted.
    Crc,
}

/// CRC-8 as the SHT3x computes it: polynomial 0x31, init 0xFF, no reflection, no final XOR.
pub fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0xFFu8;
    for &byte in data {
        crc ^= byte;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x31
            } else {
                crc << 1
            };
        }
    }
    crc
}

pub fn temperature_from_raw(raw: u16) -> f32 {
    -45.0 + 175.0 * raw as f32 / 65535.0
}

pub fn humidity_from_raw(raw: u16) -> f32 {
    100.0 * raw as f32 / 65535.0
}

pub struct Sht3x<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C: I2c> Sht3x<I2C> {
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self { i2c, address }
    }

    pub fn release(self) -> I2C {
        self.i2c
    }

    pub fn soft_reset(&mut self) -> Result<(), Error<I2C::Error>> {
        self.i2c
            .write(self.address, &CMD_SOFT_RESET)
            .map_err(Error::I2c)
    }

    /// One single-shot measurement: command, wait for the conversion, read and check 6 bytes.
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Reading, Error<I2C::Error>> {
        self.i2c
            .write(self.address, &CMD_MEASURE_HIGH)
            .map_err(Error::I2c)?;
        delay.delay_us(MEASUREMENT_US);
        let mut buf = [0u8; 6];
        self.i2c.read(self.address, &mut buf).map_err(Error::I2c)?;
        if crc8(&buf[0..2]) != buf[2] || crc8(&buf[3..5]) != buf[5] {
            return Err(Error::Crc);
        }
        Ok(Reading {
            temperature_c: temperature_from_raw(u16::from_be_bytes([buf[0], buf[1]])),
            humidity_pct: humidity_from_raw(u16::from_be_bytes([buf[3], buf[4]])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

    #[test]
    fn crc_matches_the_datasheet_example() {
        // Datasheet section 4.12: CRC of 0xBEEF is 0x92.
        assert_eq!(crc8(&[0xBE, 0xEF]), 0x92);
        assert_eq!(crc8(&[0x00, 0x00]), 0x81);
    }

    #[test]
    fn conversions_match_the_datasheet_formulas() {
        assert_eq!(temperature_from_raw(0), -45.0);
        assert_eq!(temperature_from_raw(0xFFFF), 130.0);
        assert!((temperature_from_raw(0x6666) - 25.0).abs() < 0.01);
        assert_eq!(humidity_from_raw(0xFFFF), 100.0);
        assert!((humidity_from_raw(0x8000) - 50.0).abs() < 0.01);
    }

    #[test]
    fn a_measurement_is_the_exact_datasheet_transaction() {
        // 0x6666 -> 25.0 °C, 0x8000 -> 50.0 %RH, each word followed by its CRC.
        let t = [0x66, 0x66, crc8(&[0x66, 0x66])];
        let h = [0x80, 0x00, crc8(&[0x80, 0x00])];
        let expectations = [
            Transaction::write(0x44, vec![0x24, 0x00]),
            Transaction::read(0x44, [t.as_slice(), h.as_slice()].concat()),
        ];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Sht3x::new(&mut i2c, DEFAULT_ADDRESS);
        let r = sensor.measure(&mut NoopDelay).unwrap();
        assert!((r.temperature_c - 25.0).abs() < 0.01, "{r:?}");
        assert!((r.humidity_pct - 50.0).abs() < 0.01, "{r:?}");
        i2c.done();
    }

    #[test]
    fn a_bad_crc_is_reported_not_converted() {
        let expectations = [
            Transaction::write(0x44, vec![0x24, 0x00]),
            Transaction::read(
                0x44,
                vec![0x66, 0x66, 0x00, 0x80, 0x00, crc8(&[0x80, 0x00])],
            ),
        ];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Sht3x::new(&mut i2c, DEFAULT_ADDRESS);
        assert_eq!(sensor.measure(&mut NoopDelay), Err(Error::Crc));
        i2c.done();
    }

    #[test]
    fn a_missing_sensor_is_a_bus_error() {
        let expectations =
            [
                Transaction::write(0x44, vec![0x24, 0x00]).with_error(ErrorKind::NoAcknowledge(
                    embedded_hal::i2c::NoAcknowledgeSource::Address,
                )),
            ];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Sht3x::new(&mut i2c, DEFAULT_ADDRESS);
        assert!(matches!(sensor.measure(&mut NoopDelay), Err(Error::I2c(_))));
        i2c.done();
    }

    #[test]
    fn soft_reset_sends_0x30a2() {
        let expectations = [Transaction::write(0x45, vec![0x30, 0xA2])];
        let mut i2c = Mock::new(&expectations);
        Sht3x::new(&mut i2c, 0x45).soft_reset().unwrap();
        i2c.done();
    }
}
