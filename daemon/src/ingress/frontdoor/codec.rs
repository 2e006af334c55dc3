//! MQTT 3.1.1 and 5 on one port, through rumqttc's `mqttbytes` codecs (server side). This file
//! only picks the version from the CONNECT packet and maps both versions' packets to the few
//! events the front door handles ([`In`]) and back ([`Out`]).

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("packet of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("unsupported protocol level {0}")]
    UnsupportedVersion(u8),
}

/// The protocol level of the CONNECT at the start of `buf`: None until enough bytes arrived.
pub fn detect(buf: &[u8]) -> Result<Option<Version>, CodecError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(CodecError::Malformed(
            "the first packet must be CONNECT".into(),
        ));
    }
    // Remaining length: 1-4 bytes of 7-bit groups.
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(CodecError::Malformed("bad remaining length".into()));
        }
    }
    // Protocol name (2-byte length + "MQTT" or "MQIsdp"), then the level byte.
    let Some(name_len) = buf
        .get(i..i + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    else {
        return Ok(None);
    };
    let Some(&level) = buf.get(i + 2 + name_len) else {
        return Ok(None);
    };
    match level {
        4 => Ok(Some(Version::V311)),
        5 => Ok(Some(Version::V5)),
        other => Err(CodecError::UnsupportedVersion(other)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: Bytes,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// What a device sends that the front door acts on.
#[derive(Debug)]
pub enum In {
    Connect {
        client_id: String,
        keep_alive: u16,
        clean: bool,
        will: Option<Will>,
        /// MQTT 5: the client's Receive Maximum for publishes we send it.
        receive_maximum: Option<u16>,
        /// MQTT 5: how long the session outlives the connection (0: it does not).
        session_expiry: Option<u32>,
        /// Username and password, if given.
        login: Option<(String, String)>,
    },
    Publish {
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        retain: bool,
    },
    PubAck {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `with_will`: MQTT 5's "disconnect with will message".
    Disconnect {
        with_will: bool,
    },
    /// Packets a server does not expect (CONNACK, SUBACK...) or QoS 2 flow packets.
    Unexpected(&'static str),
}

/// Why a publish was not taken, as MQTT 5 PUBACK reason codes can say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    QuotaExceeded,
    TopicNameInvalid,
    PayloadFormatInvalid,
    NoMatchingSubscribers,
    ImplementationSpecific,
    /// The buffer could not store it (a full or failing disk): MQTT 5 "Unspecified error".
    NotStored,
    /// A policy does not allow it (MQTT 5 "Not authorized", 0x87).
    NotAuthorized,
}

/// Why a subscription was refused (MQTT 3.1.1 says only "failure").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubRefused {
    /// Not a valid topic filter.
    Invalid,
    /// The session already holds `MAX_FILTERS` filters.
    Quota,
    /// A policy does not allow it.
    NotAuthorized,
}

/// What the front door sends.
#[derive(Debug)]
pub enum Out {
    ConnAck {
        session_present: bool,
        /// None: accepted.
        refused: Option<ConnRefusal>,
        receive_maximum: u16,
        max_packet_size: u32,
        assigned_client_id: Option<String>,
    },
    PubAck {
        pkid: u16,
        refused: Option<Refusal>,
    },
    Publish {
        topic: Bytes,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        retain: bool,
        dup: bool,
    },
    SubAck {
        pkid: u16,
        /// Granted QoS per filter, or why it was refused.
        granted: Vec<Result<u8, SubRefused>>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    /// MQTT 5 only; a 3.1.1 connection is just closed.
    Disconnect(DisconnectReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    BadClientId,
    ServerUnavailable,
    BadCredentials,
    NotAuthorized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    SessionTakenOver,
    KeepAliveTimeout,
    QoSNotSupported,
    PacketTooLarge,
    ProtocolError,
    ServerShuttingDown,
}

/// Reads and writes one connection's packets, once its version is known.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub version: Version,
    pub max_packet: usize,
}

fn qos4(q: m4::QoS) -> u8 {
    q as u8
}

fn qos5(q: m5::QoS) -> u8 {
    q as u8
}

impl Codec {
    /// The next whole packet in `buf`, or None when more bytes are needed.
    pub fn read(&self, buf: &mut BytesMut) -> Result<Option<In>, CodecError> {
        match self.version {
            Version::V311 => match v4::Packet::read(buf, self.max_packet) {
                Ok(p) => Ok(Some(from_v4(p))),
                Err(m4::Error::InsufficientBytes(_)) => Ok(None),
                Err(m4::Error::PayloadSizeLimitExceeded(n)) => Err(CodecError::TooLarge(n)),
                Err(e) => Err(CodecError::Malformed(e.to_string())),
            },
            // MQTT 5 §3.14.2.1: a DISCONNECT with remaining length 0 means reason 0x00, normal
            // disconnection (what mosquitto sends); rumqttc's reader refuses it as malformed.
            Version::V5 if buf.starts_with(&[0xE0, 0x00]) => {
                let _ = buf.split_to(2);
                Ok(Some(In::Disconnect { with_will: false }))
            }
            Version::V5 => match v5::Packet::read(buf, Some(self.max_packet as u32)) {
                Ok(p) => Ok(Some(from_v5(p))),
                Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                Err(m5::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
                    Err(CodecError::TooLarge(pkt_size))
                }
                Err(e) => Err(CodecError::Malformed(e.to_string())),
            },
        }
    }

    pub fn write(&self, out: Out, buf: &mut BytesMut) -> Result<(), CodecError> {
        let written = match self.version {
            Version::V311 => {
                to_v4(out).map(|p| p.write(buf, usize::MAX).map_err(|e| e.to_string()))
            }
            Version::V5 => to_v5(out).map(|p| p.write(buf, None).map_err(|e| e.to_string())),
        };
        match written {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(CodecError::Malformed(e)),
        }
    }
}

fn from_v4(p: v4::Packet) -> In {
    match p {
        v4::Packet::Connect(c) => In::Connect {
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean: c.clean_session,
            will: c.last_will.map(|w| Will {
                topic: Bytes::from(w.topic.into_bytes()),
                payload: w.message,
                qos: qos4(w.qos),
                retain: w.retain,
            }),
            receive_maximum: None,
            session_expiry: None,
            login: c.login.map(|l| (l.username, l.password)),
        },
        v4::Packet::Publish(p) => In::Publish {
            topic: Bytes::from(p.topic.into_bytes()),
            payload: p.payload,
            qos: qos4(p.qos),
            pkid: p.pkid,
            retain: p.retain,
        },
        v4::Packet::PubAck(a) => In::PubAck { pkid: a.pkid },
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos4(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect { with_will: false },
        v4::Packet::PubRec(_) | v4::Packet::PubRel(_) | v4::Packet::PubComp(_) => {
            In::Unexpected("QoS 2")
        }
        _ => In::Unexpected("a packet only a server sends"),
    }
}

fn from_v5(p: v5::Packet) -> In {
    match p {
        v5::Packet::Connect(c, will, login) => In::Connect {
            login: login.map(|l| (l.username, l.password)),
            receive_maximum: c.properties.as_ref().and_then(|p| p.receive_maximum),
            session_expiry: c
                .properties
                .as_ref()
                .and_then(|p| p.session_expiry_interval),
            client_id: c.client_id,
            keep_alive: c.keep_alive,
            clean: c.clean_start,
            will: will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos5(w.qos),
                retain: w.retain,
            }),
        },
        v5::Packet::Publish(p) => In::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: qos5(p.qos),
            pkid: p.pkid,
            retain: p.retain,
        },
        v5::Packet::PubAck(a) => In::PubAck { pkid: a.pkid },
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos5(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::PubRec(_) | v5::Packet::PubRel(_) | v5::Packet::PubComp(_) => {
            In::Unexpected("QoS 2")
        }
        _ => In::Unexpected("a packet only a server sends"),
    }
}

fn q4(q: u8) -> m4::QoS {
    if q == 0 {
        m4::QoS::AtMostOnce
    } else {
        m4::QoS::AtLeastOnce
    }
}

fn q5(q: u8) -> m5::QoS {
    if q == 0 {
        m5::QoS::AtMostOnce
    } else {
        m5::QoS::AtLeastOnce
    }
}

fn to_v4(out: Out) -> Option<v4::Packet> {
    Some(match out {
        Out::ConnAck {
            session_present,
            refused,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match refused {
                None => v4::ConnectReturnCode::Success,
                Some(ConnRefusal::BadClientId) => v4::ConnectReturnCode::BadClientId,
                Some(ConnRefusal::ServerUnavailable) => v4::ConnectReturnCode::ServiceUnavailable,
                Some(ConnRefusal::BadCredentials) => v4::ConnectReturnCode::BadUserNamePassword,
                Some(ConnRefusal::NotAuthorized) => v4::ConnectReturnCode::NotAuthorized,
            },
            session_present,
        )),
        Out::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(pkid)),
        Out::Publish {
            topic,
            payload,
            qos,
            pkid,
            retain,
            dup,
        } => {
            let mut p = v4::Publish::from_bytes(String::from_utf8_lossy(&topic), q4(qos), payload);
            p.pkid = pkid;
            p.retain = retain;
            p.dup = dup;
            v4::Packet::Publish(p)
        }
        Out::SubAck { pkid, granted } => v4::Packet::SubAck(v4::SubAck::new(
            pkid,
            granted
                .into_iter()
                .map(|g| match g {
                    Ok(q) => v4::SubscribeReasonCode::Success(q4(q)),
                    Err(_) => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Out::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(pkid)),
        Out::PingResp => v4::Packet::PingResp,
        // MQTT 3.1.1 has no server DISCONNECT: the connection is closed instead.
        Out::Disconnect(_) => return None,
    })
}

fn to_v5(out: Out) -> Option<v5::Packet> {
    Some(match out {
        Out::ConnAck {
            session_present,
            refused,
            receive_maximum,
            max_packet_size,
            assigned_client_id,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present,
            code: match refused {
                None => v5::ConnectReturnCode::Success,
                Some(ConnRefusal::BadClientId) => v5::ConnectReturnCode::ClientIdentifierNotValid,
                Some(ConnRefusal::ServerUnavailable) => v5::ConnectReturnCode::ServerUnavailable,
                Some(ConnRefusal::BadCredentials) => v5::ConnectReturnCode::BadUserNamePassword,
                Some(ConnRefusal::NotAuthorized) => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: Some(v5::ConnAckProperties {
                receive_max: Some(receive_maximum),
                max_qos: Some(1),
                max_packet_size: Some(max_packet_size),
                assigned_client_identifier: assigned_client_id,
                topic_alias_max: Some(0),
                shared_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                session_expiry_interval: None,
                retain_available: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Out::PubAck { pkid, refused } => v5::Packet::PubAck(v5::PubAck {
            pkid,
            reason: match refused {
                None => v5::PubAckReason::Success,
                Some(Refusal::QuotaExceeded) => v5::PubAckReason::QuotaExceeded,
                Some(Refusal::TopicNameInvalid) => v5::PubAckReason::TopicNameInvalid,
                Some(Refusal::PayloadFormatInvalid) => v5::PubAckReason::PayloadFormatInvalid,
                Some(Refusal::NoMatchingSubscribers) => v5::PubAckReason::NoMatchingSubscribers,
                Some(Refusal::ImplementationSpecific) => {
                    v5::PubAckReason::ImplementationSpecificError
                }
                Some(Refusal::NotStored) => v5::PubAckReason::UnspecifiedError,
                Some(Refusal::NotAuthorized) => v5::PubAckReason::NotAuthorized,
            },
            properties: None,
        }),
        Out::Publish {
            topic,
            payload,
            qos,
            pkid,
            retain,
            dup,
        } => v5::Packet::Publish(v5::Publish {
            dup,
            qos: q5(qos),
            retain,
            topic,
            pkid,
            payload,
            properties: None,
        }),
        Out::SubAck { pkid, granted } => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: granted
                .into_iter()
                .map(|g| match g {
                    Ok(q) => v5::SubscribeReasonCode::Success(q5(q)),
                    Err(SubRefused::Invalid) => v5::SubscribeReasonCode::TopicFilterInvalid,
                    Err(SubRefused::Quota) => v5::SubscribeReasonCode::QuotaExceeded,
                    Err(SubRefused::NotAuthorized) => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Out::UnsubAck { pkid, count } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }),
        Out::PingResp => v5::Packet::PingResp(v5::PingResp),
        Out::Disconnect(reason) => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: match reason {
                DisconnectReason::SessionTakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                DisconnectReason::QoSNotSupported => v5::DisconnectReasonCode::QoSNotSupported,
                DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
                DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                DisconnectReason::ServerShuttingDown => {
                    v5::DisconnectReasonCode::ServerShuttingDown
                }
            },
            properties: None,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(version: Version) -> BytesMut {
        let mut buf = BytesMut::new();
        match version {
            Version::V311 => {
                v4::Packet::Connect(v4::Connect::new("dev-1"))
                    .write(&mut buf, usize::MAX)
                    .unwrap();
            }
            Version::V5 => {
                let connect = v5::Connect {
                    keep_alive: 30,
                    client_id: "dev-1".into(),
                    clean_start: true,
                    properties: None,
                };
                v5::Packet::Connect(connect, None, None)
                    .write(&mut buf, None)
                    .unwrap();
            }
        }
        buf
    }

    #[test]
    fn detects_the_version_from_connect() {
        for v in [Version::V311, Version::V5] {
            let buf = connect_bytes(v);
            assert_eq!(detect(&buf).unwrap(), Some(v));
            assert_eq!(detect(&buf[..5]).unwrap(), None, "needs more bytes");
            let codec = Codec {
                version: v,
                max_packet: 1024,
            };
            let mut b = buf.clone();
            match codec.read(&mut b).unwrap() {
                Some(In::Connect { client_id, .. }) => assert_eq!(client_id, "dev-1"),
                other => panic!("{other:?}"),
            }
        }
        assert!(detect(&[0x30, 0]).is_err(), "PUBLISH before CONNECT");
    }

    #[test]
    fn a_disconnect_without_a_reason_code_is_a_normal_disconnection_in_both_versions() {
        for v in [Version::V311, Version::V5] {
            let codec = Codec {
                version: v,
                max_packet: 1024,
            };
            // What mosquitto sends; then a PINGREQ, read after it.
            let mut buf = BytesMut::from(&[0xE0, 0x00, 0xC0, 0x00][..]);
            assert!(matches!(
                codec.read(&mut buf).unwrap(),
                Some(In::Disconnect { with_will: false })
            ));
            assert!(matches!(codec.read(&mut buf).unwrap(), Some(In::PingReq)));
        }
    }

    #[test]
    fn publish_round_trips_and_partial_packets_wait() {
        for v in [Version::V311, Version::V5] {
            let codec = Codec {
                version: v,
                max_packet: 1024,
            };
            let mut buf = BytesMut::new();
            codec
                .write(
                    Out::Publish {
                        topic: Bytes::from_static(b"a/b"),
                        payload: Bytes::from_static(b"{}"),
                        qos: 1,
                        pkid: 7,
                        retain: false,
                        dup: false,
                    },
                    &mut buf,
                )
                .unwrap();
            let mut half = BytesMut::from(&buf[..buf.len() - 1]);
            assert!(codec.read(&mut half).unwrap().is_none());
            match codec.read(&mut buf).unwrap() {
                Some(In::Publish {
                    topic,
                    payload,
                    qos,
                    pkid,
                    ..
                }) => {
                    assert_eq!(
                        (&topic[..], &payload[..], qos, pkid),
                        (&b"a/b"[..], &b"{}"[..], 1, 7)
                    );
                }
                other => panic!("{other:?}"),
            }
            let mut big = BytesMut::new();
            codec
                .write(
                    Out::Publish {
                        topic: Bytes::from_static(b"a"),
                        payload: Bytes::from(vec![0u8; 2000]),
                        qos: 0,
                        pkid: 0,
                        retain: false,
                        dup: false,
                    },
                    &mut big,
                )
                .unwrap();
            assert!(matches!(codec.read(&mut big), Err(CodecError::TooLarge(_))));
        }
    }
}
