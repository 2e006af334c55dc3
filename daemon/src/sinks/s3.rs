//! The `s3` sink: puts each staged object under its key with aws-sdk-s3 — one PutObject, or a
//! multipart upload above the threshold. A key is derived from the batch, so a retry after a
//! timeout overwrites the same object instead of leaving a second copy.

use std::path::{Path, PathBuf};

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use futures_util::stream::{self, StreamExt, TryStreamExt};

use super::aws::{custom_endpoint, describe, endpoint_label, sdk_config, sink_error};
use super::{SinkError, Staging};
use crate::config::{Compression, S3Config};

pub struct S3Sink {
    client: Client,
    bucket: String,
    multipart_threshold: u64,
    content_encoding: Option<&'static str>,
    endpoint: String,
    staging: PathBuf,
    /// Parts of one multipart upload put at once.
    concurrency: usize,
}

impl S3Sink {
    pub async fn new(
        config: &S3Config,
        compression: Compression,
        staging: &Path,
        concurrency: usize,
    ) -> Self {
        let sdk = sdk_config(&config.aws).await;
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            // Emulators and older S3-compatible stores do not all take streaming checksums.
            .request_checksum_calculation(
                aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
            )
            .force_path_style(
                config
                    .force_path_style
                    .unwrap_or_else(|| custom_endpoint(&config.aws, "AWS_ENDPOINT_URL_S3")),
            );
        if let Some(e) = &config.aws.endpoint {
            builder = builder.endpoint_url(e);
        }
        let endpoint = endpoint_label(&config.aws, "AWS_ENDPOINT_URL_S3", &sdk);
        Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            multipart_threshold: config.multipart_threshold,
            content_encoding: compression.content_encoding(),
            endpoint,
            staging: staging.to_path_buf(),
            concurrency,
        }
    }

    pub fn staging_path(&self, name: &str) -> PathBuf {
        self.staging.join(format!("{name}.part"))
    }

    pub fn describe(&self) -> String {
        format!("s3://{} ({})", self.bucket, self.endpoint)
    }

    /// Whether the bucket exists and these credentials reach it.
    pub async fn check(&self) -> Result<(), SinkError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                let mut message = describe("HeadBucket", &e);
                if e.raw_response().map(|r| r.status().as_u16()) == Some(404) {
                    message = format!("bucket {:?} does not exist ({message})", self.bucket);
                } else if e.raw_response().map(|r| r.status().as_u16()) == Some(403) {
                    message = format!(
                        "access to bucket {:?} denied: check the credentials ({message})",
                        self.bucket
                    );
                }
                SinkError::Remote(message)
            })
    }

    pub async fn put(&self, staged: &Staging, key: &str) -> Result<(), SinkError> {
        let len = match staged {
            Staging::File(path) => tokio::fs::metadata(path).await?.len(),
            Staging::Memory(data) => data.len() as u64,
        };
        if len > self.multipart_threshold {
            return self.put_multipart(staged, key, len).await;
        }
        let body = body(staged, 0, len).await?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(len as i64)
            .set_content_encoding(self.content_encoding.map(str::to_string))
            .body(body)
            .send()
            .await
            .map_err(|e| sink_error("PutObject", &e))?;
        Ok(())
    }

    async fn put_multipart(&self, staged: &Staging, key: &str, len: u64) -> Result<(), SinkError> {
        let part_size = self.multipart_threshold;
        let upload = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_content_encoding(self.content_encoding.map(str::to_string))
            .send()
            .await
            .map_err(|e| sink_error("CreateMultipartUpload", &e))?;
        let Some(upload_id) = upload.upload_id() else {
            return Err(SinkError::Remote(
                "CreateMultipartUpload returned no upload id".into(),
            ));
        };
        let result = async {
            // Parts go up `concurrency` at a time, each read from the staged file at its offset;
            // `buffered` keeps them in part-number order for the completion.
            let count = len.div_ceil(part_size);
            let parts: Vec<CompletedPart> = stream::iter(0..count)
                .map(|i| async move {
                    let offset = i * part_size;
                    let size = part_size.min(len - offset);
                    let number = i as i32 + 1;
                    let body = body(staged, offset, size).await?;
                    let out = self
                        .client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .content_length(size as i64)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| sink_error("UploadPart", &e))?;
                    Ok::<_, SinkError>(
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(out.e_tag().map(str::to_string))
                            .build(),
                    )
                })
                .buffered(self.concurrency.max(1))
                .try_collect()
                .await?;
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| sink_error("CompleteMultipartUpload", &e))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            // Leave no orphaned parts behind (they cost storage); the batch is retried whole.
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .await;
        }
        result
    }
}

/// `len` bytes of a staged object from `offset`: read from its file as the request goes, or a
/// slice of it in memory.
async fn body(staged: &Staging, offset: u64, len: u64) -> Result<ByteStream, SinkError> {
    match staged {
        Staging::Memory(data) => Ok(ByteStream::from(
            data.slice(offset as usize..(offset + len) as usize),
        )),
        Staging::File(path) => ByteStream::read_from()
            .path(path)
            .offset(offset)
            .length(aws_sdk_s3::primitives::Length::Exact(len))
            .build()
            .await
            .map_err(|e| SinkError::Io(std::io::Error::other(e))),
    }
}
