//! What the AWS sinks share: one SDK configuration per destination (region, endpoint and
//! credentials from config, else the SDK's default chain), one HTTPS client (rustls with ring,
//! the crypto that cross-compiles without cmake), and readable errors.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

use crate::config::AwsConfig;

/// Loads the SDK configuration for one destination. Loading never fails: a missing region or
/// credentials show up as errors on the first request, which the destination reports and retries.
pub async fn sdk_config(aws: &AwsConfig) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        // The SDK's standard retries (AWS-SEMANTICS 24); the destination retries for hours on top.
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(60))
                .build(),
        );
    if let Some(region) = &aws.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &aws.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// Whether an endpoint other than AWS's own is in use for `service_env` (for example
/// `AWS_ENDPOINT_URL_S3`): then emulators want path-style addressing.
pub fn custom_endpoint(aws: &AwsConfig, service_env: &str) -> bool {
    aws.endpoint.is_some()
        || std::env::var_os(service_env).is_some()
        || std::env::var_os("AWS_ENDPOINT_URL").is_some()
}

/// Where requests go, for logs: the configured endpoint, else the service's environment
/// variable, else the SDK's general endpoint, else AWS itself.
pub fn endpoint_label(aws: &AwsConfig, service_env: &str, sdk: &SdkConfig) -> String {
    aws.endpoint
        .clone()
        .or_else(|| std::env::var(service_env).ok())
        .or_else(|| sdk.endpoint_url().map(str::to_string))
        .unwrap_or_else(|| "AWS".into())
}

/// A one-line account of an SDK error: the service's code and message, or what went wrong on
/// the way (no region, no credentials, unreachable endpoint, timeout). Never credentials.
pub fn describe<E, R>(op: &str, err: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match err {
        SdkError::ServiceError(e) => {
            let e = e.err();
            format!(
                "{op}: {} ({})",
                e.message().unwrap_or("no message"),
                e.code().unwrap_or("no error code")
            )
        }
        SdkError::TimeoutError(_) => format!("{op}: timed out"),
        SdkError::DispatchFailure(d) => {
            let why = if d.is_io() {
                "cannot reach the endpoint"
            } else if d.is_timeout() {
                "timed out connecting"
            } else {
                "request not sent"
            };
            format!(
                "{op}: {why}: {}",
                aws_smithy_types::error::display::DisplayErrorContext(err)
            )
        }
        _ => format!(
            "{op}: {}",
            aws_smithy_types::error::display::DisplayErrorContext(err)
        ),
    }
}

/// Error codes with which AWS services ask a client to slow down.
const THROTTLING_CODES: &[&str] = &[
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "ProvisionedThroughputExceededException",
    "LimitExceededException",
    "TooManyRequestsException",
];

/// An SDK error as a sink error: throttling (a throttling code, HTTP 429 or 503, with the
/// response's `Retry-After` seconds when given) is told apart from failures.
pub fn sink_error<E>(
    op: &str,
    err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> super::SinkError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = describe(op, err);
    let code = match err {
        SdkError::ServiceError(e) => e.err().code().map(str::to_string),
        _ => None,
    };
    let raw = err.raw_response();
    let status = raw.map(|r| r.status().as_u16());
    let throttled = code
        .as_deref()
        .is_some_and(|c| THROTTLING_CODES.contains(&c))
        || matches!(status, Some(429 | 503));
    if throttled {
        let retry_after = raw
            .and_then(|r| r.headers().get("retry-after"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_secs);
        return super::SinkError::Throttled {
            message,
            retry_after,
        };
    }
    super::SinkError::Remote(message)
}
