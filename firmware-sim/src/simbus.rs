//! A simulated I2C bus that implements the embedded-hal 1.0 `I2c` trait and answers at register
//! level, as an SHT3x (0x44) and a BMP280 (0x76) would, from a physical model of the device's
//! surroundings: a daily temperature cycle, humidity that falls as the air warms, pressure with
//! slow weather, sensor noise and drift. Faults can be injected so the drivers' error paths run
//! for real: a corrupted CRC, a bus NACK, a stuck reading, a missing sensor.

use embedded_hal::i2c::{ErrorKind, ErrorType, I2c, NoAcknowledgeSource, Operation};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::drivers::bmp280::{self, Calibration};
use crate::drivers::sht3x;

/// The surroundings of one device.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Environment {
    /// Daily mean temperature.
    pub temperature_c: f64,
    /// Peak-to-mean amplitude of the daily cycle.
    pub temperature_swing_c: f64,
    /// Daily mean relative humidity.
    pub humidity_pct: f64,
    /// Mean air pressure.
    pub pressure_hpa: f64,
    /// Standard deviation of each reading's noise, in °C (scaled for the other quantities).
    pub noise: f64,
    /// Slow sensor drift, °C per day.
    pub drift_c_per_day: f64,
}

impl Default for Environment {
    fn default() -> Self {
        Self {
            temperature_c: 21.0,
            temperature_swing_c: 3.0,
            humidity_pct: 45.0,
            pressure_hpa: 1013.25,
            noise: 0.05,
            drift_c_per_day: 0.01,
        }
    }
}

/// Probabilities (per measurement) and states of injected faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// A reading whose CRC is corrupted (SHT3x).
    pub crc: f64,
    /// A transfer the sensor does not acknowledge.
    pub nack: f64,
    /// The sensor keeps returning its first reading.
    pub stuck: bool,
    /// The sensor is absent: its address is never acknowledged.
    pub missing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimError(pub ErrorKind);

impl embedded_hal::i2c::Error for SimError {
    fn kind(&self) -> ErrorKind {
        self.0
    }
}

pub struct SimBus {
    env: Environment,
    faults: Faults,
    rng: SmallRng,
    /// Seconds since the Unix epoch the model is evaluated at.
    now_s: f64,
    /// Where this device sits in the day (devices are not all in one time zone of heat).
    phase: f64,
    sht_pending: Option<[u8; 6]>,
    sht_stuck: Option<(u16, u16)>,
    bmp_regs: [u8; 256],
    bmp_pointer: u8,
    bmp_stuck: Option<(i32, i32)>,
}

const SHT_ADDRESS: u8 = sht3x::DEFAULT_ADDRESS;
const BMP_ADDRESS: u8 = bmp280::DEFAULT_ADDRESS;

impl SimBus {
    pub fn new(env: Environment, faults: Faults, seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut bmp_regs = [0u8; 256];
        bmp_regs[bmp280::REG_CHIP_ID as usize] = bmp280::CHIP_ID;
        let cal = Calibration::DATASHEET_EXAMPLE.to_bytes();
        let at = bmp280::REG_CALIBRATION as usize;
        bmp_regs[at..at + 24].copy_from_slice(&cal);
        Self {
            env,
            faults,
            phase: rng.random_range(-0.05..0.05),
            rng,
            now_s: 0.0,
            sht_pending: None,
            sht_stuck: None,
            bmp_regs,
            bmp_pointer: 0,
            bmp_stuck: None,
        }
    }

    pub fn set_time(&mut self, unix_s: f64) {
        self.now_s = unix_s;
    }

    /// A normally distributed sample (Box-Muller) with standard deviation `sd`.
    fn noise(&mut self, sd: f64) -> f64 {
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random();
        sd * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// True conditions now: (°C, %RH, Pa).
    pub fn conditions(&mut self) -> (f64, f64, f64) {
        let e = self.env;
        let day = self.now_s / 86_400.0 + self.phase;
        // Warmest mid-afternoon, coolest before dawn.
        let cycle = (std::f64::consts::TAU * (day.fract() - 0.375)).sin();
        let temperature = e.temperature_c + e.temperature_swing_c * cycle;
        // Warmer air holds more water: relative humidity falls ~3 %/°C at constant moisture.
        let humidity = (e.humidity_pct - 3.0 * (temperature - e.temperature_c)).clamp(0.0, 100.0);
        // Weather: a slow few-day pressure wave.
        let pressure = (e.pressure_hpa + 8.0 * (std::f64::consts::TAU * day / 3.7).sin()) * 100.0;
        (temperature, humidity, pressure)
    }

    fn drift(&self) -> f64 {
        // Drift counts from the start of the simulation's day 0 (a sensor's age).
        self.env.drift_c_per_day * (self.now_s / 86_400.0).fract()
    }

    fn fault(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random::<f64>() < p
    }

    fn sht_measure(&mut self) -> [u8; 6] {
        let (t, h, _) = self.conditions();
        let t = t + self.drift() + self.noise(self.env.noise);
        let h = (h + self.noise(self.env.noise * 4.0)).clamp(0.0, 100.0);
        let raw_t = (((t + 45.0) / 175.0) * 65535.0).clamp(0.0, 65535.0) as u16;
        let raw_h = ((h / 100.0) * 65535.0).clamp(0.0, 65535.0) as u16;
        let (raw_t, raw_h) = if self.faults.stuck {
            *self.sht_stuck.get_or_insert((raw_t, raw_h))
        } else {
            (raw_t, raw_h)
        };
        let [t0, t1] = raw_t.to_be_bytes();
        let [h0, h1] = raw_h.to_be_bytes();
        let mut out = [
            t0,
            t1,
            sht3x::crc8(&[t0, t1]),
            h0,
            h1,
            sht3x::crc8(&[h0, h1]),
        ];
        if self.fault(self.faults.crc) {
            out[2] ^= 0x5A;
        }
        out
    }

    /// Fills the BMP280's data registers with the raw values a real one would show.
    fn bmp_measure(&mut self) {
        let (t, _, p) = self.conditions();
        let t = t + self.drift() * 0.5 + self.noise(self.env.noise);
        let p = p + self.noise(self.env.noise * 40.0);
        let (adc_t, adc_p) = match (self.faults.stuck, self.bmp_stuck) {
            (true, Some(v)) => v,
            _ => {
                let v = invert(&Calibration::DATASHEET_EXAMPLE, t, p);
                if self.faults.stuck {
                    self.bmp_stuck = Some(v);
                }
                v
            }
        };
        let put = |regs: &mut [u8; 256], at: usize, adc: i32| {
            regs[at] = (adc >> 12) as u8;
            regs[at + 1] = (adc >> 4) as u8;
            regs[at + 2] = ((adc & 0xF) << 4) as u8;
        };
        put(&mut self.bmp_regs, bmp280::REG_DATA as usize, adc_p);
        put(&mut self.bmp_regs, bmp280::REG_DATA as usize + 3, adc_t);
    }

    fn sht(&mut self, op: &mut Operation<'_>) -> Result<(), SimError> {
        match op {
            Operation::Write(bytes) => match *bytes {
                b if b == sht3x::CMD_MEASURE_HIGH => {
                    self.sht_pending = Some(self.sht_measure());
                    Ok(())
                }
                b if b == sht3x::CMD_SOFT_RESET => {
                    self.sht_pending = None;
                    Ok(())
                }
                _ => Err(SimError(ErrorKind::NoAcknowledge(
                    NoAcknowledgeSource::Data,
                ))),
            },
            Operation::Read(buf) => match self.sht_pending.take() {
                Some(m) if buf.len() <= 6 => {
                    buf.copy_from_slice(&m[..buf.len()]);
                    Ok(())
                }
                // No measurement ready: the SHT3x does not acknowledge the read header.
                _ => Err(SimError(ErrorKind::NoAcknowledge(
                    NoAcknowledgeSource::Address,
                ))),
            },
        }
    }

    fn bmp(&mut self, op: &mut Operation<'_>) -> Result<(), SimError> {
        match op {
            Operation::Write(bytes) => {
                let Some((&reg, rest)) = bytes.split_first() else {
                    return Ok(());
                };
                self.bmp_pointer = reg;
                if let Some(&value) = rest.first() {
                    self.bmp_regs[reg as usize] = value;
                    if reg == bmp280::REG_CTRL_MEAS && value & 0b11 != 0 {
                        self.bmp_measure();
                    }
                }
                Ok(())
            }
            Operation::Read(buf) => {
                for b in buf.iter_mut() {
                    *b = self.bmp_regs[self.bmp_pointer as usize];
                    self.bmp_pointer = self.bmp_pointer.wrapping_add(1);
                }
                Ok(())
            }
        }
    }
}

/// The raw ADC values a BMP280 with `cal` reports for (°C, Pa): the datasheet's compensation
/// solved backwards by bisection (it is monotonic in each raw value).
pub fn invert(cal: &Calibration, temperature_c: f64, pressure_pa: f64) -> (i32, i32) {
    let (mut lo, mut hi) = (0i32, (1 << 20) - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if cal.compensate(mid, 0).0 < temperature_c {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let adc_t = lo;
    // Pressure falls as adc_P rises.
    let (mut lo, mut hi) = (0i32, (1 << 20) - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if cal.compensate(adc_t, mid).1 > pressure_pa {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    (adc_t, lo)
}

impl ErrorType for SimBus {
    type Error = SimError;
}

impl I2c for SimBus {
    fn transaction(
        &mut self,
        address: u8,
        operations: &mut [Operation<'_>],
    ) -> Result<(), Self::Error> {
        let present = matches!(address, SHT_ADDRESS | BMP_ADDRESS) && !self.faults.missing;
        if !present {
            return Err(SimError(ErrorKind::NoAcknowledge(
                NoAcknowledgeSource::Address,
            )));
        }
        if self.fault(self.faults.nack) {
            return Err(SimError(ErrorKind::NoAcknowledge(
                NoAcknowledgeSource::Data,
            )));
        }
        for op in operations.iter_mut() {
            match address {
                SHT_ADDRESS => self.sht(op)?,
                _ => self.bmp(op)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::bmp280::Bmp280;
    use crate::drivers::sht3x::{self, Sht3x};
    use embedded_hal::delay::DelayNs;

    struct NoDelay;
    impl DelayNs for NoDelay {
        fn delay_ns(&mut self, _ns: u32) {}
    }

    fn bus(faults: Faults) -> SimBus {
        let mut b = SimBus::new(Environment::default(), faults, 7);
        b.set_time(1_700_000_000.0);
        b
    }

    #[test]
    fn the_drivers_read_what_the_model_says() {
        let mut b = bus(Faults::default());
        let (t, h, p) = b.conditions();
        let r = Sht3x::new(&mut b, sht3x::DEFAULT_ADDRESS)
            .measure(&mut NoDelay)
            .unwrap();
        assert!((r.temperature_c as f64 - t).abs() < 0.5, "{r:?} vs {t}");
        assert!((r.humidity_pct as f64 - h).abs() < 2.0, "{r:?} vs {h}");
        let mut bmp = Bmp280::new(&mut b, bmp280::DEFAULT_ADDRESS);
        bmp.init().unwrap();
        let r = bmp.measure(&mut NoDelay).unwrap();
        assert!((r.temperature_c - t).abs() < 0.5, "{r:?} vs {t}");
        assert!((r.pressure_pa - p).abs() < 50.0, "{r:?} vs {p}");
    }

    #[test]
    fn the_day_has_a_cycle() {
        let mut b = bus(Faults::default());
        let temps: Vec<f64> = (0..24)
            .map(|h| {
                b.set_time(1_700_000_000.0 + h as f64 * 3600.0);
                b.conditions().0
            })
            .collect();
        let (min, max) = temps
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &t| (lo.min(t), hi.max(t)));
        assert!(max - min > 5.0, "swing {}", max - min);
    }

    #[test]
    fn inverting_the_compensation_round_trips() {
        let cal = Calibration::DATASHEET_EXAMPLE;
        let (adc_t, adc_p) = invert(&cal, 25.08, 100653.27);
        let (t, p) = cal.compensate(adc_t, adc_p);
        assert!(
            (t - 25.08).abs() < 0.01 && (p - 100653.27).abs() < 5.0,
            "{t} {p}"
        );
    }

    #[test]
    fn faults_reach_the_drivers_error_paths() {
        let mut b = bus(Faults {
            crc: 1.0,
            ..Faults::default()
        });
        assert_eq!(
            Sht3x::new(&mut b, sht3x::DEFAULT_ADDRESS).measure(&mut NoDelay),
            Err(sht3x::Error::Crc)
        );
        let mut b = bus(Faults {
            nack: 1.0,
            ..Faults::default()
        });
        assert!(matches!(
            Sht3x::new(&mut b, sht3x::DEFAULT_ADDRESS).measure(&mut NoDelay),
            Err(sht3x::Error::I2c(_))
        ));
        let mut b = bus(Faults {
            missing: true,
            ..Faults::default()
        });
        assert!(matches!(
            Bmp280::new(&mut b, bmp280::DEFAULT_ADDRESS).init(),
            Err(bmp280::Error::I2c(SimError(ErrorKind::NoAcknowledge(
                NoAcknowledgeSource::Address
            ))))
        ));
        let mut b = bus(Faults {
            stuck: true,
            ..Faults::default()
        });
        let mut s = Sht3x::new(&mut b, sht3x::DEFAULT_ADDRESS);
        let first = s.measure(&mut NoDelay).unwrap();
        let mut b = s.release();
        b.set_time(1_700_000_000.0 + 6.0 * 3600.0);
        let later = Sht3x::new(&mut b, sht3x::DEFAULT_ADDRESS)
            .measure(&mut NoDelay)
            .unwrap();
        assert_eq!(first, later, "a stuck sensor repeats itself");
    }

    #[test]
    fn reading_an_sht3x_without_a_measurement_is_not_acknowledged() {
        let mut b = bus(Faults::default());
        let mut buf = [0u8; 6];
        assert_eq!(
            b.read(sht3x::DEFAULT_ADDRESS, &mut buf),
            Err(SimError(ErrorKind::NoAcknowledge(
                NoAcknowledgeSource::Address
            )))
        );
    }
}
