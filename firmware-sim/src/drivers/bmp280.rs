//! Bosch BMP280 pressure and temperature sensor over I2C, written against the embedded-hal 1.0
//! traits, following the datasheet (BST-BMP280-DS001): chip id 0x58 at 0xD0, 24 bytes of
//! calibration at 0x88 (little-endian dig_T1..dig_P9), forced-mode measurement through ctrl_meas
//! (0xF4), 20-bit raw values at 0xF7..0xFC, and the datasheet's floating-point compensation.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// I2C address with SDO low (0x77 with it high).
pub const DEFAULT_ADDRESS: u8 = 0x76;
pub const REG_CHIP_ID: u8 = 0xD0;
pub const CHIP_ID: u8 = 0x58;
pub const REG_CALIBRATION: u8 = 0x88;
pub const REG_CTRL_MEAS: u8 = 0xF4;
pub const REG_DATA: u8 = 0xF7;
/// ctrl_meas: osrs_t = x1 (bits 7-5: 001), osrs_p = x1 (bits 4-2: 001), forced mode (bits 1-0: 01).
pub const CTRL_MEAS_FORCED_X1: u8 = (0b001 << 5) | (0b001 << 2) | 0b01;
/// Datasheet: at x1/x1 a measurement takes at most 6.4 ms.
pub const MEASUREMENT_US: u32 = 6_400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    pub t1: u16,
    pub t2: i16,
    pub t3: i16,
    pub p1: u16,
    pub p2: i16,
    pub p3: i16,
    pub p4: i16,
    pub p5: i16,
    pub p6: i16,
    pub p7: i16,
    pub p8: i16,
    pub p9: i16,
}

impl Calibration {
    pub fn from_bytes(b: &[u8; 24]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let s = |i: usize| i16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            t1: u(0),
            t2: s(2),
            t3: s(4),
            p1: u(6),
            p2: s(8),
            p3: s(10),
            p4: s(12),
            p5: s(14),
            p6: s(16),
            p7: s(18),
            p8: s(20),
            p9: s(22),
        }
    }

    pub fn to_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        let words = [
            self.t1.to_le_bytes(),
            self.t2.to_le_bytes(),
            self.t3.to_le_bytes(),
            self.p1.to_le_bytes(),
            self.p2.to_le_bytes(),
            self.p3.to_le_bytes(),
            self.p4.to_le_bytes(),
            self.p5.to_le_bytes(),
            self.p6.to_le_bytes(),
            self.p7.to_le_bytes(),
            self.p8.to_le_bytes(),
            self.p9.to_le_bytes(),
        ];
        for (i, w) in words.iter().enumerate() {
            b[2 * i..2 * i + 2].copy_from_slice(w);
        }
        b
    }

    /// The datasheet's example calibration (section 3.12).
    pub const DATASHEET_EXAMPLE: Calibration = Calibration {
        t1: 27504,
        t2: 26435,
        t3: -1000,
        p1: 36477,
        p2: -10685,
        p3: 3024,
        p4: 2855,
        p5: 140,
        p6: -7,
        p7: 15500,
        p8: -14600,
        p9: 6000,
    };

    /// Datasheet section 8.1 (double precision): (°C, Pa).
    pub fn compensate(&self, adc_t: i32, adc_p: i32) -> (f64, f64) {
        let (adc_t, adc_p) = (adc_t as f64, adc_p as f64);
        let t1 = self.t1 as f64;
        let var1 = (adc_t / 16384.0 - t1 / 1024.0) * self.t2 as f64;
        let d = adc_t / 131072.0 - t1 / 8192.0;
        let var2 = d * d * self.t3 as f64;
        let t_fine = var1 + var2;
        let temperature = t_fine / 5120.0;

        let mut var1 = t_fine / 2.0 - 64000.0;
        let mut var2 = var1 * var1 * self.p6 as f64 / 32768.0;
        var2 += var1 * self.p5 as f64 * 2.0;
        var2 = var2 / 4.0 + self.p4 as f64 * 65536.0;
        var1 = (self.p3 as f64 * var1 * var1 / 524288.0 + self.p2 as f64 * var1) / 524288.0;
        var1 = (1.0 + var1 / 32768.0) * self.p1 as f64;
        if var1 == 0.0 {
            return (temperature, 0.0);
        }
        let mut p = 1048576.0 - adc_p;
        p = (p - var2 / 4096.0) * 6250.0 / var1;
        let var1 = self.p9 as f64 * p * p / 2147483648.0;
        let var2 = p * self.p8 as f64 / 32768.0;
        (temperature, p + (var1 + var2 + self.p7 as f64) / 16.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub temperature_c: f64,
    pub pressure_pa: f64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Error<E> {
    I2c(E),
    /// Something answered at the address, but it is not a BMP280.
    WrongChip(u8),
    /// `measure` before `init`.
    NotInitialised,
}

pub struct Bmp280<I2C> {
    i2c: I2C,
    address: u8,
    calibration: Option<Calibration>,
}

impl<I2C: I2c> Bmp280<I2C> {
    pub fn new(i2c: I2C, address: u8) -> Self {
        Self {
            i2c,
            address,
            calibration: None,
        }
    }

    /// A driver for a sensor whose calibration was read before (it never changes).
    pub fn with_calibration(i2c: I2C, address: u8, calibration: Calibration) -> Self {
        Self {
            i2c,
            address,
            calibration: Some(calibration),
        }
    }

    pub fn calibration(&self) -> Option<Calibration> {
        self.calibration
    }

    /// Checks the chip id and reads the calibration.
    pub fn init(&mut self) -> Result<(), Error<I2C::Error>> {
        let mut id = [0u8];
        self.i2c
            .write_read(self.address, &[REG_CHIP_ID], &mut id)
            .map_err(Error::I2c)?;
        if id[0] != CHIP_ID {
            return Err(Error::WrongChip(id[0]));
        }
        let mut cal = [0u8; 24];
        self.i2c
            .write_read(self.address, &[REG_CALIBRATION], &mut cal)
            .map_err(Error::I2c)?;
        self.calibration = Some(Calibration::from_bytes(&cal));
        Ok(())
    }

    /// One forced-mode measurement.
    pub fn measure(&mut self, delay: &mut impl DelayNs) -> Result<Reading, Error<I2C::Error>> {
        let cal = self.calibration.ok_or(Error::NotInitialised)?;
        self.i2c
            .write(self.address, &[REG_CTRL_MEAS, CTRL_MEAS_FORCED_X1])
            .map_err(Error::I2c)?;
        delay.delay_us(MEASUREMENT_US);
        let mut d = [0u8; 6];
        self.i2c
            .write_read(self.address, &[REG_DATA], &mut d)
            .map_err(Error::I2c)?;
        let raw = |m: u8, l: u8, x: u8| ((m as i32) << 12) | ((l as i32) << 4) | ((x as i32) >> 4);
        let adc_p = raw(d[0], d[1], d[2]);
        let adc_t = raw(d[3], d[4], d[5]);
        let (temperature_c, pressure_pa) = cal.compensate(adc_t, adc_p);
        Ok(Reading {
            temperature_c,
            pressure_pa,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::delay::NoopDelay;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

    #[test]
    fn compensation_matches_the_datasheet_example() {
        // Datasheet section 3.12: adc_T 519888 -> 25.08 °C, adc_P 415148 -> 100653.27 Pa.
        let (t, p) = Calibration::DATASHEET_EXAMPLE.compensate(519888, 415148);
        assert!((t - 25.08).abs() < 0.01, "{t}");
        assert!((p - 100653.27).abs() < 0.5, "{p}");
    }

    #[test]
    fn calibration_bytes_round_trip() {
        let c = Calibration::DATASHEET_EXAMPLE;
        assert_eq!(Calibration::from_bytes(&c.to_bytes()), c);
    }

    #[test]
    fn init_and_measure_are_the_exact_datasheet_transactions() {
        // 519888 = 0x7EED0 -> msb 0x7E, lsb 0xED, xlsb 0x00; 415148 = 0x655AC -> 0x65 0x5A 0xC0.
        let expectations = [
            Transaction::write_read(0x76, vec![0xD0], vec![0x58]),
            Transaction::write_read(
                0x76,
                vec![0x88],
                Calibration::DATASHEET_EXAMPLE.to_bytes().to_vec(),
            ),
            Transaction::write(0x76, vec![0xF4, 0x25]),
            Transaction::write_read(0x76, vec![0xF7], vec![0x65, 0x5A, 0xC0, 0x7E, 0xED, 0x00]),
        ];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Bmp280::new(&mut i2c, DEFAULT_ADDRESS);
        sensor.init().unwrap();
        let r = sensor.measure(&mut NoopDelay).unwrap();
        assert!((r.temperature_c - 25.08).abs() < 0.01, "{r:?}");
        assert!((r.pressure_pa - 100653.27).abs() < 0.5, "{r:?}");
        i2c.done();
    }

    #[test]
    fn another_chip_at_the_address_is_refused() {
        let expectations = [Transaction::write_read(0x76, vec![0xD0], vec![0x60])];
        let mut i2c = Mock::new(&expectations);
        let mut sensor = Bmp280::new(&mut i2c, DEFAULT_ADDRESS);
        assert_eq!(sensor.init(), Err(Error::WrongChip(0x60)));
        assert_eq!(sensor.measure(&mut NoopDelay), Err(Error::NotInitialised));
        i2c.done();
    }
}
