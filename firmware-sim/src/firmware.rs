//! The device firmware: read the sensors through their drivers, note any fault, and build the
//! telemetry payload (JSON with device id, sequence number, timestamp, readings, fault flags).

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::{Error as _, ErrorKind, I2c, NoAcknowledgeSource};
use serde::Serialize;

use crate::drivers::{bmp280, sht3x};

/// Which sensors a device has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensorKind {
    Sht3x,
    Bmp280,
}

/// Delay for the simulated bus: its sensors answer at once.
pub struct NoDelay;

impl DelayNs for NoDelay {
    fn delay_ns(&mut self, _ns: u32) {}
}

#[derive(Debug, Default, Serialize)]
struct Telemetry<'a> {
    device: &'a str,
    seq: u64,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature_c: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    humidity_pct: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pressure_hpa: Option<f32>,
    faults: Vec<&'static str>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pad: String,
}

fn bus_fault(kind: ErrorKind, missing: &'static str, bus: &'static str) -> &'static str {
    match kind {
        ErrorKind::NoAcknowledge(NoAcknowledgeSource::Address) => missing,
        _ => bus,
    }
}

pub struct Firmware<B, D> {
    pub id: String,
    bus: B,
    delay: D,
    sensors: Vec<SensorKind>,
    /// The BMP280's calibration, read once.
    bmp_calibration: Option<bmp280::Calibration>,
    pad_to: usize,
}

impl<B: I2c, D: DelayNs> Firmware<B, D> {
    pub fn new(id: String, bus: B, delay: D, sensors: Vec<SensorKind>, pad_to: usize) -> Self {
        Self {
            id,
            bus,
            delay,
            sensors,
            bmp_calibration: None,
            pad_to,
        }
    }

    pub fn bus_mut(&mut self) -> &mut B {
        &mut self.bus
    }

    /// Reads every sensor once and returns the JSON payload for message `seq`.
    pub fn sample(&mut self, seq: u64, ts_ms: u64) -> Vec<u8> {
        let mut t = Telemetry {
            device: &self.id,
            seq,
            ts: ts_ms,
            ..Default::default()
        };
        for kind in self.sensors.clone() {
            match kind {
                SensorKind::Sht3x => {
                    match sht3x::Sht3x::new(&mut self.bus, sht3x::DEFAULT_ADDRESS)
                        .measure(&mut self.delay)
                    {
                        Ok(r) => {
                            t.temperature_c = Some(round2(r.temperature_c));
                            t.humidity_pct = Some(round2(r.humidity_pct));
                        }
                        Err(sht3x::Error::Crc) => t.faults.push("sht3x_crc"),
                        Err(sht3x::Error::I2c(e)) => {
                            t.faults
                                .push(bus_fault(e.kind(), "sht3x_missing", "sht3x_bus"))
                        }
                    }
                }
                SensorKind::Bmp280 => {
                    // The calibration is read once; a failed read is retried next sample.
                    let reading = match self.bmp_calibration {
                        Some(cal) => bmp280::Bmp280::with_calibration(
                            &mut self.bus,
                            bmp280::DEFAULT_ADDRESS,
                            cal,
                        )
                        .measure(&mut self.delay),
                        None => {
                            let mut bmp =
                                bmp280::Bmp280::new(&mut self.bus, bmp280::DEFAULT_ADDRESS);
                            let r = bmp.init().and_then(|_| bmp.measure(&mut self.delay));
                            self.bmp_calibration = bmp.calibration();
                            r
                        }
                    };
                    match reading {
                        Ok(r) => {
                            t.pressure_hpa = Some(round2(r.pressure_pa as f32 / 100.0));
                            if t.temperature_c.is_none() {
                                t.temperature_c = Some(round2(r.temperature_c as f32));
                            }
                        }
                        Err(bmp280::Error::I2c(e)) => {
                            t.faults
                                .push(bus_fault(e.kind(), "bmp280_missing", "bmp280_bus"))
                        }
                        Err(bmp280::Error::WrongChip(_)) => t.faults.push("bmp280_wrong_chip"),
                        Err(bmp280::Error::NotInitialised) => t.faults.push("bmp280_init"),
                    }
                }
            }
        }
        let mut body = serde_json::to_vec(&t).unwrap_or_default();
        if body.len() + 9 < self.pad_to {
            t.pad = noise_hex(&self.id, seq, self.pad_to - body.len() - 9);
            body = serde_json::to_vec(&t).unwrap_or_default();
        }
        body
    }
}

/// `len` hex digits that differ per device and sample, like a signature or trace field. Padding
/// must not compress better than real data would: load tests measure what compression saves.
fn noise_hex(id: &str, seq: u64, len: usize) -> String {
    let mut x = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"0123456789abcdef"[(x >> 60) as usize])
        })
        .collect()
}

fn round2(v: f32) -> f32 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simbus::{Environment, Faults, SimBus};

    fn firmware(faults: Faults, sensors: Vec<SensorKind>) -> Firmware<SimBus, NoDelay> {
        let mut bus = SimBus::new(Environment::default(), faults, 1);
        bus.set_time(1_700_000_000.0);
        Firmware::new("dev-1".into(), bus, NoDelay, sensors, 200)
    }

    #[test]
    fn a_sample_is_padded_json_with_the_readings() {
        let mut f = firmware(
            Faults::default(),
            vec![SensorKind::Sht3x, SensorKind::Bmp280],
        );
        let body = f.sample(7, 1_700_000_000_000);
        assert_eq!(body.len(), 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["device"], "dev-1");
        assert_eq!(v["seq"], 7);
        assert!(v["temperature_c"].as_f64().unwrap() > -10.0);
        assert!(v["humidity_pct"].as_f64().unwrap() > 0.0);
        assert!(v["pressure_hpa"].as_f64().unwrap() > 900.0);
        assert_eq!(v["faults"].as_array().unwrap().len(), 0);
        // Later samples reuse the calibration read the first time.
        let v: serde_json::Value = serde_json::from_slice(&f.sample(8, 1_700_000_001_000)).unwrap();
        assert!(v["pressure_hpa"].as_f64().unwrap() > 900.0, "{v}");
    }

    #[test]
    fn sensor_faults_become_flags_and_missing_readings() {
        let mut f = firmware(
            Faults {
                missing: true,
                ..Faults::default()
            },
            vec![SensorKind::Sht3x, SensorKind::Bmp280],
        );
        let v: serde_json::Value = serde_json::from_slice(&f.sample(0, 0)).unwrap();
        assert_eq!(
            v["faults"],
            serde_json::json!(["sht3x_missing", "bmp280_missing"])
        );
        assert!(v.get("temperature_c").is_none());
        let mut f = firmware(
            Faults {
                crc: 1.0,
                ..Faults::default()
            },
            vec![SensorKind::Sht3x],
        );
        let v: serde_json::Value = serde_json::from_slice(&f.sample(0, 0)).unwrap();
        assert_eq!(v["faults"], serde_json::json!(["sht3x_crc"]));
    }
}
