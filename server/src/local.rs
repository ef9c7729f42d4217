//! In-process dispatch: the same kernels, request checking and GPU executor
//! as the server, with no network in between. It is the baseline that tells
//! what going remote costs (`quasar bench --compare-local`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use quasar_transport::io::ChunkedPayload;
use quasar_transport::wire::{PayloadLayout, access_request, encode_request};
use quasar_transport::{ECHO_KERNEL, Limits, Payload, RequestHeader, StatusCode, Timings};
use thiserror::Error;
use tokio::sync::oneshot;

use crate::gpu::executor::{GpuExecutor, Job, JobOutput, Reservation};
use crate::gpu::{AdapterSummary, GpuError};
use crate::kernel::plan::{plan, plan_echo};
use crate::{GpuConfig, Registry};

/// Why a local dispatch failed: the status the server would have sent.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{code}: {message}")]
pub struct LocalError {
    /// The status code.
    pub code: StatusCode,
    /// The message.
    pub message: String,
}

/// A finished local dispatch.
#[derive(Debug)]
pub struct LocalOutput {
    /// The outputs, laid out as a response payload.
    pub payload: Payload,
    /// Where each output sits in `payload`.
    pub layout: PayloadLayout,
    /// The executor's timings (total: header check to outputs ready).
    pub timings: Timings,
}

/// Runs calls on a local GPU executor.
#[derive(Debug)]
pub struct LocalDispatcher {
    executor: GpuExecutor,
    limits: Limits,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl LocalDispatcher {
    /// Starts an executor with `config` (adapter, kernels, queue depth).
    ///
    /// # Errors
    /// [`GpuError`] as for the server.
    pub async fn start(config: GpuConfig) -> Result<Self, GpuError> {
        Ok(Self {
            executor: GpuExecutor::start(config).await?,
            limits: Limits::default(),
        })
    }

    /// The adapter calls run on.
    pub fn adapter(&self) -> &AdapterSummary {
        self.executor.adapter()
    }

    /// The loaded kernels.
    pub fn registry(&self) -> Arc<Registry> {
        self.executor.registry()
    }

    /// Runs one call: the header is archived and checked exactly as a
    /// received one would be, then queued for the GPU.
    ///
    /// # Errors
    /// [`LocalError`] with the status the server would have answered.
    pub async fn dispatch(
        &self,
        header: &RequestHeader,
        payload: Payload,
    ) -> Result<LocalOutput, LocalError> {
        let started = Instant::now();
        let fail = |code, message: String| LocalError { code, message };
        if header.kernel == ECHO_KERNEL {
            return self.echo(header, payload, started);
        }
        let (layout, rx) = self.submit(header, payload)?;
        let out = rx
            .await
            .map_err(|_| fail(StatusCode::Internal, "the executor dropped the call".into()))?
            .map_err(|e| fail(e.status(), e.to_string()))?;
        Ok(LocalOutput {
            payload: out.payload,
            layout,
            timings: Timings {
                queued_us: micros(out.queued),
                gpu_us: micros(out.gpu),
                kernel_us: out.kernel.map(micros),
                readback_us: micros(out.readback),
                total_us: micros(started.elapsed()),
            },
        })
    }

    /// The built-in echo, checked as the server checks it.
    fn echo(
        &self,
        header: &RequestHeader,
        payload: Payload,
        started: Instant,
    ) -> Result<LocalOutput, LocalError> {
        let invalid = |message: String| LocalError {
            code: StatusCode::InvalidArgument,
            message,
        };
        let bytes = encode_request(header).map_err(|e| invalid(e.to_string()))?;
        let archived = access_request(&bytes).map_err(|e| invalid(e.to_string()))?;
        plan_echo(archived, payload.len() as u64, &self.limits).map_err(|e| LocalError {
            code: e.code,
            message: e.message,
        })?;
        let layout = PayloadLayout::new(
            header
                .buffers
                .iter()
                .map(|b| (b.name.as_str(), b.elem, b.len)),
        )
        .map_err(|e| invalid(e.to_string()))?;
        Ok(LocalOutput {
            payload,
            layout,
            timings: Timings {
                total_us: micros(started.elapsed()),
                ..Timings::default()
            },
        })
    }

    /// Checks and queues a call; the reply comes on the receiver. Kept
    /// apart from the `async fn` so its future holds no kernel registry
    /// (whose GPU handles make auto-trait checks deep).
    #[allow(clippy::type_complexity)]
    fn submit(
        &self,
        header: &RequestHeader,
        payload: Payload,
    ) -> Result<
        (
            PayloadLayout,
            oneshot::Receiver<Result<JobOutput, crate::gpu::executor::ExecError>>,
        ),
        LocalError,
    > {
        let fail = |code, message: String| LocalError { code, message };
        let bytes =
            encode_request(header).map_err(|e| fail(StatusCode::InvalidArgument, e.to_string()))?;
        let archived =
            access_request(&bytes).map_err(|e| fail(StatusCode::InvalidArgument, e.to_string()))?;
        let registry = self.executor.registry();
        let (index, kernel) = registry.get(&header.kernel).ok_or_else(|| {
            fail(
                StatusCode::NotFound,
                format!("no kernel named `{}`", header.kernel),
            )
        })?;
        let plan = plan(
            index,
            kernel,
            archived,
            payload.len() as u64,
            &self.limits,
            &registry.caps(),
        )
        .map_err(|e| fail(e.code, e.message))?;
        let layout = plan.response_layout.clone();
        let (tx, rx) = oneshot::channel();
        self.executor
            .queue()
            .try_submit(Job {
                plan,
                kernels: registry.clone(),
                source: 0,
                payload: ChunkedPayload::from_bytes(bytes::Bytes::from_owner(payload)),
                enqueued: Instant::now(),
                deadline: None,
                reply: tx,
                reservation: Reservation::default(),
            })
            .map_err(|e| fail(e.status(), e.to_string()))?;
        Ok((layout, rx))
    }

    /// Stops the executor thread.
    pub async fn shutdown(self) {
        self.executor.shutdown().await;
    }
}
