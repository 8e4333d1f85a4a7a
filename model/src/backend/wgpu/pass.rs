//! One forward pass on the device: host inputs, the recorded dispatches, submission in
//! growing pieces, and the read-back of logits, hidden states and device picks; and the
//! copy-on-write copies of KV blocks that go before it.

use super::profile::{self, Timestamps};
use super::record::{Fused, HeadParams, NormParams, Recorder, SampleParams};
use super::{device_err, WgpuBackend};
use crate::arch::RopeStyle;
use crate::backend::{rope_angles, ForwardBatch, HiddenLayer};
use crate::error::Result;
use crate::kv::KV_BLOCK_TOKENS;
use crate::sampling::Draw;

impl WgpuBackend {
    /// Sends the pending copy-on-write copies: WebGPU forbids a copy within one buffer, so
    /// every block's K and V slabs of every layer go into one staging buffer, then out, in one
    /// command buffer (a fresh buffer and a submit per copy cost ~50 µs each when a search
    /// forks hundreds of sequences).
    pub(super) fn flush_copies(&mut self) {
        if self.pending_copies.is_empty() {
            return;
        }
        let kv_dim = self.config.kv_dim() as u64;
        let slab = KV_BLOCK_TOKENS as u64 * kv_dim * 4;
        let block = 2 * slab;
        let layers = self.kv.len() as u64;
        let need = self.pending_copies.len() as u64 * layers * block;
        if self.copy_staging.as_ref().is_none_or(|b| b.size() < need) {
            self.copy_staging = Some(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("kv_copy"),
                size: need.next_power_of_two(),
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }));
        }
        let staging = self.copy_staging.as_ref().expect("allocated above");
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("kv_copy"),
            });
        for out in [false, true] {
            for (c, &(src, dst, n_tokens)) in self.pending_copies.iter().enumerate() {
                let len = n_tokens as u64 * kv_dim * 4;
                for (l, buf) in self.kv.iter().enumerate() {
                    for kind in 0..2u64 {
                        let at = ((c as u64 * layers + l as u64) * 2 + kind) * slab;
                        if out {
                            let to = dst as u64 * block + kind * slab;
                            enc.copy_buffer_to_buffer(staging, at, buf, to, len);
                        } else {
                            let from = src as u64 * block + kind * slab;
                            enc.copy_buffer_to_buffer(buf, from, staging, at, len);
                        }
                    }
                }
            }
        }
        self.queue.submit([enc.finish()]);
        self.pending_copies.clear();
    }

    /// One forward pass whose logits fit one storage binding.
    ///
    /// Rows are projected for `logits_for`, then `sample_for` (picked on the device with
    /// `sample.wgsl`, only the picks read back), and hidden states kept for `hidden_for`.
    pub(super) fn forward_pass(
        &mut self,
        batch: &ForwardBatch<'_>,
        (sample_for, draws): (&[u32], &[Draw]),
        (logits, hidden): (&mut Vec<f32>, &mut Vec<f32>),
        picks: &mut Vec<(u32, f32)>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        self.flush_copies();
        let cfg = self.config.clone();
        let n = batch.tokens.len();
        let (ml, ms, mh) = (
            batch.logits_for.len(),
            sample_for.len(),
            batch.hidden_for.len(),
        );
        let nl = batch.hidden_layers.len();
        // Rows through the output projection: returned ones, then sampled ones.
        let m = ml + ms;
        logits.resize(ml * cfg.vocab_size, 0.0);
        hidden.resize(mh * nl * cfg.d_model, 0.0);
        picks.clear();
        picks.resize(ms, (0, 0.0));
        if n == 0 {
            return Ok(());
        }
        let d = cfg.d_model;
        let hd = cfg.head_dim;
        let half = hd / 2;
        let q_dim = cfg.n_heads * hd;
        let kv_dim = cfg.kv_dim();
        let qkv_dim = q_dim + 2 * kv_dim;

        // Host-side inputs: embeddings, RoPE angles, per-token KV addresses, block tables.
        let mut x = vec![0f32; n * d];
        for (i, &t) in batch.tokens.iter().enumerate() {
            self.weights
                .embed
                .dequantize_row_into(t as usize, &mut x[i * d..(i + 1) * d]);
        }
        let mut cs = Vec::with_capacity(n * half * 2);
        for &p in batch.positions {
            for theta in rope_angles(&cfg, p) {
                cs.extend([theta.cos(), theta.sin()]);
            }
        }
        let mut table_off = Vec::with_capacity(batch.block_tables.len());
        let mut tables: Vec<u32> = Vec::new();
        for t in batch.block_tables {
            table_off.push(tables.len() as u32);
            tables.extend_from_slice(t);
        }
        let mut tok = Vec::with_capacity(n * 4);
        for i in 0..n {
            let pos = batch.positions[i] as usize;
            let s = batch.seq_index[i] as usize;
            tok.extend_from_slice(&[
                pos as u32,
                table_off[s],
                batch.block_tables[s][pos / KV_BLOCK_TOKENS],
                (pos % KV_BLOCK_TOKENS) as u32,
            ]);
        }
        let mut sel: Vec<u32> = batch.logits_for.to_vec();
        sel.extend_from_slice(sample_for);
        sel.extend_from_slice(batch.hidden_for);

        self.ensure_scratch(n, m, m + mh * nl, tables.len().max(1))?;
        // A product takes a dispatch a chunk, or two where it splits its columns.
        let products = if self.scratch.as_ref().is_some_and(|s| s.part.is_some()) {
            2
        } else {
            1
        };
        let per_layer = 4 + products
            * (self.layers[0].qkv.chunks.len()
                + self.layers[0].gate_up.chunks.len()
                + self.layers[0].wo.chunks.len()
                + self.layers[0].down.chunks.len());
        let slots = per_layer * cfg.n_layers + 3 + nl + products * self.output.chunks.len();
        self.ensure_params(slots);
        if self.has_timestamps && !self.timestamps.as_ref().is_some_and(|t| t.fits(slots)) {
            self.timestamps = Some(Timestamps::new(
                &self.device,
                &self.queue,
                Timestamps::wanted(slots),
            ));
        }
        let s = self.scratch.as_ref().expect("scratch allocated above");
        self.queue.write_buffer(&s.x, 0, bytemuck::cast_slice(&x));
        self.queue.write_buffer(&s.cs, 0, bytemuck::cast_slice(&cs));
        self.queue
            .write_buffer(&s.tok, 0, bytemuck::cast_slice(&tok));
        self.queue
            .write_buffer(&s.tables, 0, bytemuck::cast_slice(&tables));
        if !sel.is_empty() {
            self.queue
                .write_buffer(&s.sel, 0, bytemuck::cast_slice(&sel));
        }
        if ms > 0 {
            self.queue
                .write_buffer(&s.draws, 0, bytemuck::cast_slice(draws));
        }

        let prepared = std::time::Instant::now();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let p = &self.pipelines;
        let mut rec = Recorder {
            device: &self.device,
            params: &self.params,
            blob: Vec::new(),
            dispatches: Vec::new(),
            cache: &mut self.bind_cache,
            part: s.part.as_ref(),
        };
        // `sel`: the rows read are `sel[from..]`, written from output row `to`.
        let norm = |rows: usize, sel: Option<(usize, usize)>| NormParams {
            n_rows: rows as u32,
            d: d as u32,
            eps: cfg.rms_eps,
            use_sel: sel.is_some() as u32,
            sel_from: sel.map_or(0, |s| s.0 as u32),
            out_from: sel.map_or(0, |s| s.1 as u32),
            pad: [0; 2],
        };
        let heads = |word5: u32, rope: u32| HeadParams {
            n_heads: cfg.n_heads as u32,
            n_kv_heads: cfg.n_kv_heads as u32,
            head_dim: hd as u32,
            qkv_stride: qkv_dim as u32,
            kv_dim: kv_dim as u32,
            word5,
            block_tokens: KV_BLOCK_TOKENS as u32,
            rope,
        };
        // A decode step (every token the only one of its sequence) rotates and stores its keys
        // inside the attention kernel; otherwise every key must be in the cache first.
        let one_per_sequence = {
            let mut seen = vec![false; batch.block_tables.len()];
            batch
                .seq_index
                .iter()
                .all(|&q| !std::mem::replace(&mut seen[q as usize], true))
        };
        let interleaved = cfg.rope_style == RopeStyle::Interleaved;
        let gqa = self
            .pipelines
            .attention_gqa
            .as_ref()
            .filter(|_| self.gqa_min_tokens.is_some_and(|m| n >= m as usize));
        let fused_rope = match (one_per_sequence && gqa.is_none(), interleaved) {
            (false, _) => 0,
            (true, false) => 1,
            (true, true) => 2,
        };
        let scale = 1.0 / (hd as f32).sqrt();
        let nt = n as u32;
        let fuse_norm = self.pipelines.choice().fuse_norm(n);
        for (l, lw) in self.layers.iter().enumerate() {
            let (input, fused_norm) = rec.normed(
                p,
                fuse_norm,
                (&s.x, &s.h),
                &lw.attn_norm,
                norm(n, None),
                &self.dummy,
            );
            rec.matmul(
                p,
                "qkv",
                &lw.qkv,
                input,
                &s.qkv,
                qkv_dim,
                n,
                Fused {
                    norm: fused_norm,
                    bias: lw.qkv_bias.as_ref(),
                    ..Fused::default()
                },
                &self.dummy,
            );
            if fused_rope == 0 {
                rec.add(
                    &p.rope_kv,
                    "rope_kv",
                    heads(interleaved as u32, 0),
                    &[&s.qkv, &s.cs, &s.tok, &self.kv[l]],
                    (nt, 1, 1),
                );
            }
            match gqa {
                Some(kernel) => rec.add(
                    kernel,
                    "attention",
                    heads(scale.to_bits(), 0),
                    &[&s.qkv, &s.tok, &s.tables, &self.kv[l], &s.att],
                    (cfg.n_kv_heads as u32, nt, 1),
                ),
                None => rec.add(
                    &p.attention,
                    "attention",
                    heads(scale.to_bits(), fused_rope),
                    &[&s.qkv, &s.tok, &s.tables, &self.kv[l], &s.att, &s.cs],
                    (cfg.n_heads as u32, nt, 1),
                ),
            }
            let residual = Fused {
                accumulate: true,
                ..Fused::default()
            };
            rec.matmul(p, "wo", &lw.wo, &s.att, &s.x, d, n, residual, &self.dummy);
            let (input, fused_norm) = rec.normed(
                p,
                fuse_norm,
                (&s.x, &s.h),
                &lw.ffn_norm,
                norm(n, None),
                &self.dummy,
            );
            rec.matmul(
                p,
                "gate_up",
                &lw.gate_up,
                input,
                &s.act,
                cfg.ffn_dim,
                n,
                Fused {
                    norm: fused_norm,
                    swiglu: true,
                    ..Fused::default()
                },
                &self.dummy,
            );
            rec.matmul(
                p,
                "down",
                &lw.down,
                &s.act,
                &s.x,
                d,
                n,
                residual,
                &self.dummy,
            );
            // Hidden states read after this block: `fin` holds the logits rows, then for each
            // layer of `hidden_layers` its `mh` rows.
            for (k, layer) in batch.hidden_layers.iter().enumerate() {
                if mh > 0 && *layer == HiddenLayer::Block(l) {
                    rec.add(
                        &p.rms_norm,
                        "hidden",
                        norm(mh, Some((m, m + k * mh))),
                        &[&s.x, &self.ones, &s.fin, &s.sel],
                        (mh as u32, 1, 1),
                    );
                }
            }
        }
        // Final norm of the selected rows (logits rows, then hidden rows read there), then the
        // output projection of the logits rows.
        if m > 0 {
            rec.add(
                &p.rms_norm,
                "final_norm",
                norm(m, Some((0, 0))),
                &[&s.x, &self.out_norm, &s.fin, &s.sel],
                (m as u32, 1, 1),
            );
        }
        for (k, layer) in batch.hidden_layers.iter().enumerate() {
            if mh > 0 && *layer == HiddenLayer::Final {
                rec.add(
                    &p.rms_norm,
                    "final_norm",
                    norm(mh, Some((m, m + k * mh))),
                    &[&s.x, &self.out_norm, &s.fin, &s.sel],
                    (mh as u32, 1, 1),
                );
            }
        }
        if m > 0 {
            rec.matmul(
                p,
                "output",
                &self.output,
                &s.fin,
                &s.logits,
                cfg.vocab_size,
                m,
                Fused::default(),
                &self.dummy,
            );
        }
        if ms > 0 {
            let params = SampleParams {
                vocab: cfg.vocab_size as u32,
                first_row: ml as u32,
                pad: [0; 2],
            };
            let bufs = [&s.logits, &s.draws, &s.picks];
            rec.add(&p.sample, "sample", params, &bufs, (ms as u32, 1, 1));
        }
        self.queue.write_buffer(&self.params, 0, &rec.blob);
        let labels: Vec<&'static str> = rec.dispatches.iter().map(|d| d.label).collect();
        let recorded = std::time::Instant::now();
        // The pass goes to the GPU in command buffers of 8, 16, 32, ... dispatches, each
        // submitted as soon as it is encoded: wgpu translates a command buffer's commands for
        // the driver when it is finished, a few microseconds a dispatch, so one command buffer
        // for the whole pass would keep the GPU idle until all of it was translated. With
        // growing pieces the GPU starts after the first few and the host stays ahead of it.
        let total = rec.dispatches.len();
        let n_ts = total as u32 + 1;
        let logits_bytes = (ml * cfg.vocab_size * 4) as u64;
        let hidden_bytes = (mh * nl * d * 4) as u64;
        let picks_bytes = (ms * 8) as u64;
        let mut first = 0;
        let mut piece = 8;
        while first < total {
            let last = (first + piece).min(total);
            let mut enc = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("forward"),
                });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("forward"),
                    timestamp_writes: None,
                });
                for (k, dsp) in rec.dispatches[first..last].iter().enumerate() {
                    if let Some(ts) = &self.timestamps {
                        pass.write_timestamp(&ts.set, (first + k) as u32);
                    }
                    pass.set_pipeline(dsp.pipeline);
                    pass.set_bind_group(0, &dsp.group, &[]);
                    pass.dispatch_workgroups(dsp.size.0, dsp.size.1, dsp.size.2);
                }
                if last == total {
                    if let Some(ts) = &self.timestamps {
                        pass.write_timestamp(&ts.set, total as u32);
                    }
                }
            }
            if last == total {
                if let Some(ts) = &self.timestamps {
                    enc.resolve_query_set(&ts.set, 0..n_ts, &ts.resolve, 0);
                    enc.copy_buffer_to_buffer(&ts.resolve, 0, &ts.read, 0, n_ts as u64 * 8);
                }
                if logits_bytes > 0 {
                    enc.copy_buffer_to_buffer(&s.logits, 0, &s.readback, 0, logits_bytes);
                }
                if hidden_bytes > 0 {
                    enc.copy_buffer_to_buffer(
                        &s.fin,
                        (m * d * 4) as u64,
                        &s.readback,
                        logits_bytes,
                        hidden_bytes,
                    );
                }
                if picks_bytes > 0 {
                    let at = logits_bytes + hidden_bytes;
                    enc.copy_buffer_to_buffer(&s.picks, 0, &s.readback, at, picks_bytes);
                }
            }
            self.queue.submit([enc.finish()]);
            first = last;
            piece *= 2;
        }
        drop(rec);
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(device_err("forward pass", e));
        }
        let submitted = std::time::Instant::now();
        let read_bytes = logits_bytes + hidden_bytes + picks_bytes;
        if read_bytes == 0 && self.profile.is_none() {
            // Nothing to read: the pass only extends the KV cache. The queue orders it before
            // the next pass, so there is no need to wait.
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let mut mapping = 0;
        if read_bytes > 0 {
            let tx = tx.clone();
            s.readback
                .slice(..read_bytes)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
            mapping += 1;
        }
        if let Some(ts) = &self.timestamps {
            let tx = tx.clone();
            ts.read
                .slice(..n_ts as u64 * 8)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
            mapping += 1;
        }
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| device_err("waiting for the forward pass", e))?;
        for _ in 0..mapping {
            rx.recv()
                .map_err(|e| device_err("reading results back", e))?
                .map_err(|e| device_err("reading results back", e))?;
        }
        let waited = std::time::Instant::now();
        if let (Some(profile), Some(ts)) = (&self.profile, &self.timestamps) {
            let slice = ts.read.slice(..n_ts as u64 * 8);
            {
                let view = slice
                    .get_mapped_range()
                    .map_err(|e| device_err("reading timestamps back", e))?;
                let ticks: &[u64] = bytemuck::cast_slice(&view);
                let mut pr = profile.lock().unwrap_or_else(|e| e.into_inner());
                profile::add_kernel_times(&mut pr, &labels, ticks, ts.period);
            }
            ts.read.unmap();
        }
        if read_bytes > 0 {
            let slice = s.readback.slice(..read_bytes);
            let view = slice
                .get_mapped_range()
                .map_err(|e| device_err("reading results back", e))?;
            let floats: &[f32] = bytemuck::cast_slice(&view);
            let (rows, rest) = floats.split_at(ml * cfg.vocab_size);
            let (states, picked) = rest.split_at(mh * nl * d);
            logits.copy_from_slice(rows);
            // Layer after layer on the device; token after token (its layers together) out.
            for (k, layer_rows) in states.chunks_exact((mh * d).max(1)).enumerate() {
                for (j, row) in layer_rows.chunks_exact(d).enumerate() {
                    hidden[(j * nl + k) * d..(j * nl + k + 1) * d].copy_from_slice(row);
                }
            }
            for (out, pair) in picks.iter_mut().zip(picked.chunks_exact(2)) {
                *out = (pair[0].to_bits(), pair[1]);
            }
            drop(view);
            s.readback.unmap();
        }
        if let Some(profile) = &self.profile {
            let mut pr = profile.lock().unwrap_or_else(|e| e.into_inner());
            pr.passes += 1;
            pr.prepare += prepared - started;
            pr.record += recorded - prepared;
            pr.submit += submitted - recorded;
            pr.wait += waited - submitted;
            pr.read += waited.elapsed();
        }
        Ok(())
    }
}
