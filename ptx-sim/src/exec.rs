//! Executing one CTA: threads, warps, min-PC reconvergence, barriers, shuffles, and the
//! checks a GPU sanitizer would make.
//!
//! Each thread has its own registers and program counter. A warp is 32 consecutive linear
//! thread ids; it runs the lanes at the lowest program counter together, one instruction at
//! a time, until every lane has exited or waits at a barrier. When all warps are blocked, a
//! barrier where every live thread waits is released; anything else is a deadlock.

use crate::device::{Device, LaunchConfig, LaunchStats, NC_READ, Shape, WRITTEN};
use crate::error::{Fault, Result, SimError};
use crate::ir::*;
use crate::limits::SETUP_BYTES_PER_STEP;

const WARP: usize = 32;

/// The most bytes one thread's access moves: four elements of 8 bytes (`.v4.b64`).
const MAX_ACCESS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    AtBarrier,
    Exited,
}

/// One access to a shared word, for the race detector.
#[derive(Clone, Copy, Debug, Default)]
struct Access {
    valid: bool,
    thread: u32,
    /// Barrier epoch of the access.
    epoch: u32,
    /// The accessing warp's warp-sync count at the time.
    warp_sync: u32,
}

#[derive(Clone, Copy, Debug, Default)]
struct WordHistory {
    write: Access,
    /// The last reader, and one other distinct reader, in the current epoch.
    reads: [Access; 2],
}

struct Cta<'a> {
    device: &'a mut Device,
    kernel: &'a Kernel,
    config: &'a LaunchConfig,
    params: &'a [u8],
    cta: [u32; 3],
    threads: usize,
    registers: usize,
    regs: Vec<u64>,
    pcs: Vec<usize>,
    states: Vec<State>,
    shared: Vec<u8>,
    shared_written: Vec<bool>,
    history: Vec<WordHistory>,
    epoch: u32,
    warp_syncs: Vec<u32>,
    /// Steps the launch has taken so far, against `config.step_limit`.
    steps: u64,
}

fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

fn sign_extend(value: u64, bits: u32) -> i64 {
    if bits >= 64 {
        value as i64
    } else {
        let shift = 64 - bits;
        ((value << shift) as i64) >> shift
    }
}

fn f32_of(bits: u64) -> f32 {
    f32::from_bits(bits as u32)
}

fn of_f32(value: f32) -> u64 {
    u64::from(value.to_bits())
}

/// A float operand as `f64` (exact for every float type here).
fn float_value(bits: u64, ty: Type) -> f64 {
    match ty {
        Type::F16 => f64::from(half::f16::from_bits(bits as u16).to_f32()),
        Type::Bf16 => f64::from(f32::from_bits((bits as u32 & 0xFFFF) << 16)),
        Type::F32 => f64::from(f32_of(bits)),
        _ => f64::from_bits(bits),
    }
}

impl<'a> Cta<'a> {
    fn tid(&self, thread: usize) -> [u32; 3] {
        let [bx, by, _] = self.config.block;
        let t = thread as u32;
        [t % bx, (t / bx) % by, t / (bx * by)]
    }

    fn fault(
        &self,
        thread: usize,
        instruction: &Instruction,
        fault: Fault,
        message: impl Into<String>,
    ) -> SimError {
        SimError::Fault {
            kernel: self.kernel.name.clone(),
            fault,
            cta: self.cta,
            thread: self.tid(thread),
            line: instruction.line,
            opcode: instruction.opcode.clone(),
            message: message.into(),
        }
    }

    fn reg(&self, thread: usize, reg: RegId) -> u64 {
        self.regs[thread * self.registers + reg.0 as usize]
    }

    fn set(&mut self, thread: usize, reg: RegId, value: u64) {
        self.regs[thread * self.registers + reg.0 as usize] = value;
    }

    fn special(&self, thread: usize, special: Special) -> u64 {
        let pick = |v: [u32; 3], d: Dim| u64::from(v[d as usize]);
        match special {
            Special::Tid(d) => pick(self.tid(thread), d),
            Special::Ntid(d) => pick(self.config.block, d),
            Special::Ctaid(d) => pick(self.cta, d),
            Special::Nctaid(d) => pick(self.config.grid, d),
            Special::LaneId => (thread % WARP) as u64,
        }
    }

    /// Reads `operand` as a value of type `ty` (the low `ty.bits()` bits).
    fn read(
        &self,
        thread: usize,
        operand: &Operand,
        ty: Type,
        instruction: &Instruction,
    ) -> Result<u64> {
        let bits = ty.bits();
        let unsupported =
            |what: &str| Err(self.fault(thread, instruction, Fault::Unsupported, what.to_string()));
        let value = match *operand {
            Operand::Reg(reg) => self.reg(thread, reg),
            Operand::NotReg(reg) => !self.reg(thread, reg) & 1,
            Operand::Special(special) => self.special(thread, special),
            Operand::Shared(offset) => u64::from(offset),
            Operand::Param(_) => {
                return unsupported("the address of a parameter is not a value here");
            }
            Operand::Imm(immediate) => match (immediate, ty) {
                (Immediate::Int(v), Type::F32) => of_f32(v as f32),
                (Immediate::Int(v), Type::F64) => (v as f64).to_bits(),
                (Immediate::Int(v), _) => v as u64,
                (Immediate::F32Bits(b), Type::F64) => f64::from(f32::from_bits(b)).to_bits(),
                (Immediate::F32Bits(b), _) => u64::from(b),
                (Immediate::F64Bits(b), Type::F32) => of_f32(f64::from_bits(b) as f32),
                (Immediate::F64Bits(b), _) => b,
                (Immediate::Float(v), Type::F32) => of_f32(v as f32),
                (Immediate::Float(v), Type::F64) => v.to_bits(),
                (Immediate::Float(_), _) => {
                    return unsupported("a float literal for a non-float operand");
                }
            },
        };
        Ok(value & mask(bits))
    }

    fn guard_holds(&self, thread: usize, instruction: &Instruction) -> bool {
        match instruction.guard {
            None => true,
            Some(Guard { reg, negated }) => (self.reg(thread, reg) & 1 == 1) != negated,
        }
    }

    /// Runs warp `warp` until none of its lanes is running.
    fn run_warp(&mut self, warp: usize, stats: &mut LaunchStats) -> Result<()> {
        let lanes = warp * WARP..((warp + 1) * WARP).min(self.threads);
        let mut active: Vec<usize> = Vec::with_capacity(WARP);
        loop {
            let pc = lanes
                .clone()
                .filter(|&t| self.states[t] == State::Running)
                .map(|t| self.pcs[t])
                .min();
            let Some(pc) = pc else { return Ok(()) };
            active.clear();
            active.extend(
                lanes
                    .clone()
                    .filter(|&t| self.states[t] == State::Running && self.pcs[t] == pc),
            );
            // Counters of u64 cannot overflow: that takes 2^59 steps, centuries at this speed.
            stats.warp_instructions += 1;
            stats.thread_instructions += active.len() as u64;
            self.steps += 1;
            if self.steps > self.config.step_limit {
                // run_cta runs no kernel without instructions.
                let instruction =
                    &self.kernel.instructions[pc.min(self.kernel.instructions.len() - 1)];
                return Err(self.fault(
                    active[0],
                    instruction,
                    Fault::RunAway,
                    format!("step limit of {} exceeded", self.config.step_limit),
                ));
            }
            let Some(instruction) = self.kernel.instructions.get(pc) else {
                let last = self
                    .kernel
                    .instructions
                    .last()
                    .expect("run_cta runs no kernel without instructions");
                return Err(self.fault(
                    active[0],
                    last,
                    Fault::RunAway,
                    "ran past the last instruction (no ret)",
                ));
            };
            let participants = self.step(warp, &active, instruction)?;
            if is_global_vector_access(&instruction.op) {
                stats.global_vector_accesses += participants as u64;
            }
        }
    }

    /// Runs `instruction` on the `active` lanes of `warp`; returns how many of them it ran on
    /// (those whose guard holds).
    fn step(
        &mut self,
        warp: usize,
        active: &[usize],
        instruction: &'a Instruction,
    ) -> Result<usize> {
        // At most one warp of lanes: a stack buffer, no allocation per instruction.
        let mut lanes = [0usize; WARP];
        let mut count = 0;
        for &t in active.iter().filter(|&&t| self.guard_holds(t, instruction)) {
            lanes[count] = t;
            count += 1;
        }
        let participants = &lanes[..count];
        for &t in active {
            self.pcs[t] += 1;
        }
        match &instruction.op {
            Op::BarSync { barrier, threads } => {
                self.bar_sync(warp, participants, barrier, threads.as_ref(), instruction)?;
            }
            Op::BarWarpSync { mask } => self.warp_sync(warp, participants, mask, instruction)?,
            Op::Shfl { .. } => self.shuffle(warp, participants, instruction)?,
            _ => {
                for &t in participants {
                    self.execute(t, instruction)?;
                }
            }
        }
        Ok(count)
    }

    fn lanes_of(&self, warp: usize) -> std::ops::Range<usize> {
        warp * WARP..((warp + 1) * WARP).min(self.threads)
    }

    fn bar_sync(
        &mut self,
        warp: usize,
        participants: &[usize],
        barrier: &Operand,
        threads: Option<&Operand>,
        instruction: &Instruction,
    ) -> Result<()> {
        // A barrier whose guard is false for the whole warp is not reached by it at all.
        let Some(&first) = participants.first() else {
            return Ok(());
        };
        let number = self.read(first, barrier, Type::U32, instruction)?;
        if number != 0 || threads.is_some() {
            return Err(self.fault(
                first,
                instruction,
                Fault::Unsupported,
                "only bar.sync 0 (all threads) is supported",
            ));
        }
        let live: Vec<usize> = self
            .lanes_of(warp)
            .filter(|&t| self.states[t] != State::Exited)
            .collect();
        if participants.len() != live.len() {
            let missing: Vec<usize> = live
                .iter()
                .copied()
                .filter(|t| !participants.contains(t))
                .map(|t| t % WARP)
                .collect();
            return Err(self.fault(
                first,
                instruction,
                Fault::DivergentBarrier,
                format!("bar.sync reached by part of warp {warp}; lanes {missing:?} are elsewhere"),
            ));
        }
        for &t in participants {
            self.states[t] = State::AtBarrier;
        }
        Ok(())
    }

    /// Checks a warp collective's member mask against the lanes executing it.
    fn check_mask(
        &self,
        warp: usize,
        participants: &[usize],
        mask_bits: u32,
        instruction: &Instruction,
    ) -> Result<()> {
        // Callers return early when no lane participates.
        let first = participants[0];
        let warp_size = self.lanes_of(warp).len();
        if warp_size < WARP && mask_bits >> warp_size != 0 {
            return Err(self.fault(
                first,
                instruction,
                Fault::BadMask,
                format!("member mask {mask_bits:#010x} names lanes past the end of a {warp_size}-lane warp"),
            ));
        }
        for &t in participants {
            if mask_bits >> (t % WARP) & 1 == 0 {
                return Err(self.fault(
                    t,
                    instruction,
                    Fault::BadMask,
                    format!(
                        "lane {} executes it but is not in member mask {mask_bits:#010x}",
                        t % WARP
                    ),
                ));
            }
        }
        for lane in 0..warp_size {
            if mask_bits >> lane & 1 == 1 && !participants.contains(&(warp * WARP + lane)) {
                return Err(self.fault(
                    first,
                    instruction,
                    Fault::BadMask,
                    format!("lane {lane} is in member mask {mask_bits:#010x} but is not executing this instruction (exited or diverged)"),
                ));
            }
        }
        Ok(())
    }

    fn uniform_mask(
        &self,
        participants: &[usize],
        operand: &Operand,
        instruction: &Instruction,
    ) -> Result<u32> {
        // Callers return early when no lane participates.
        let first = participants[0];
        let mask_bits = self.read(first, operand, Type::B32, instruction)? as u32;
        for &t in participants {
            if self.read(t, operand, Type::B32, instruction)? as u32 != mask_bits {
                return Err(self.fault(
                    t,
                    instruction,
                    Fault::BadMask,
                    "lanes pass different member masks",
                ));
            }
        }
        Ok(mask_bits)
    }

    fn warp_sync(
        &mut self,
        warp: usize,
        participants: &[usize],
        mask: &Operand,
        instruction: &Instruction,
    ) -> Result<()> {
        if participants.is_empty() {
            return Ok(());
        }
        let mask_bits = self.uniform_mask(participants, mask, instruction)?;
        self.check_mask(warp, participants, mask_bits, instruction)?;
        // The race detector tells warp-sync intervals apart by this count: it must not wrap.
        self.warp_syncs[warp] = self.warp_syncs[warp].checked_add(1).ok_or_else(|| {
            self.fault(
                participants[0],
                instruction,
                Fault::Unsupported,
                "more than 2^32 bar.warp.sync in one warp",
            )
        })?;
        Ok(())
    }

    fn shuffle(
        &mut self,
        warp: usize,
        participants: &[usize],
        instruction: &Instruction,
    ) -> Result<()> {
        let Op::Shfl {
            mode,
            dst,
            pred_dst,
            src,
            lane,
            clamp,
            member_mask,
        } = &instruction.op
        else {
            unreachable!("called for shfl only")
        };
        if participants.is_empty() {
            return Ok(());
        }
        let mask_bits = self.uniform_mask(participants, member_mask, instruction)?;
        self.check_mask(warp, participants, mask_bits, instruction)?;
        // Every source is read before any lane writes.
        let mut snapshot = [0u64; WARP];
        for &t in participants {
            snapshot[t % WARP] = self.read(t, src, Type::B32, instruction)?;
        }
        let mut results = Vec::with_capacity(participants.len());
        for &t in participants {
            let own = (t % WARP) as u32;
            let b = self.read(t, lane, Type::B32, instruction)? as u32 & 0x1F;
            let c = self.read(t, clamp, Type::B32, instruction)? as u32;
            let (clamp_lane, segment) = (c & 0x1F, (c >> 8) & 0x1F);
            let max_lane = (own & segment) | (clamp_lane & !segment);
            let min_lane = own & segment;
            let (source, in_range) = match mode {
                ShuffleMode::Up => {
                    let j = own as i32 - b as i32;
                    (j, j >= max_lane as i32)
                }
                ShuffleMode::Down => ((own + b) as i32, own + b <= max_lane),
                ShuffleMode::Bfly => ((own ^ b) as i32, (own ^ b) <= max_lane),
                ShuffleMode::Idx => {
                    let j = min_lane | (b & !segment);
                    (j as i32, j <= max_lane)
                }
            };
            let source = if in_range { source as u32 } else { own };
            if in_range && (source as usize >= WARP || mask_bits >> source & 1 == 0) {
                return Err(self.fault(t, instruction, Fault::BadMask, format!("lane {own} reads lane {source}, which is not in member mask {mask_bits:#010x}")));
            }
            results.push((t, snapshot[source as usize], in_range));
        }
        for (t, value, in_range) in results {
            self.set(t, *dst, value);
            if let Some(p) = pred_dst {
                self.set(t, *p, u64::from(in_range));
            }
        }
        Ok(())
    }

    fn execute(&mut self, t: usize, instruction: &Instruction) -> Result<()> {
        let read = |cta: &Self, operand: &Operand, ty: Type| cta.read(t, operand, ty, instruction);
        match &instruction.op {
            Op::Mov { ty, dst, src } => {
                let value = read(self, src, *ty)?;
                self.set(t, *dst, value);
            }
            Op::CvtaToGlobal { dst, src } => {
                let value = read(self, src, Type::U64)?;
                self.set(t, *dst, value);
            }
            Op::Binary { op, ty, dst, a, b } => {
                let a = read(self, a, *ty)?;
                // Shift amounts are .u32 whatever the shifted type.
                let b_type = if matches!(op, BinaryOp::Shl | BinaryOp::Shr) {
                    Type::U32
                } else {
                    *ty
                };
                let b = read(self, b, b_type)?;
                let value = if ty.is_float() {
                    float_binary(*op, *ty, a, b)
                } else {
                    integer_binary(*op, *ty, a, b).ok_or_else(|| {
                        self.fault(
                            t,
                            instruction,
                            Fault::DivisionByZero,
                            "integer division by zero",
                        )
                    })?
                };
                self.set(t, *dst, value);
            }
            Op::Mad {
                wide,
                ty,
                dst,
                a,
                b,
                c,
            } => {
                let w = ty.bits();
                let out = if *wide { 2 * w } else { w };
                let (a, b) = (read(self, a, *ty)?, read(self, b, *ty)?);
                let c = self.read(t, c, if *wide { wide_type(*ty) } else { *ty }, instruction)?;
                let product = if ty.is_signed() {
                    (i128::from(sign_extend(a, w)) * i128::from(sign_extend(b, w))) as u128
                } else {
                    u128::from(a) * u128::from(b)
                };
                self.set(t, *dst, (product as u64).wrapping_add(c) & mask(out));
            }
            Op::Fma { ty, dst, a, b, c } => {
                let (a, b, c) = (
                    read(self, a, *ty)?,
                    read(self, b, *ty)?,
                    read(self, c, *ty)?,
                );
                let value = match ty {
                    Type::F32 => of_f32(f32_of(a).mul_add(f32_of(b), f32_of(c))),
                    _ => f64::from_bits(a)
                        .mul_add(f64::from_bits(b), f64::from_bits(c))
                        .to_bits(),
                };
                self.set(t, *dst, value);
            }
            Op::Unary { op, ty, dst, a } => {
                let a = read(self, a, *ty)?;
                let bits = ty.bits();
                let value = match (op, ty.is_float()) {
                    (UnaryOp::Neg, false) => {
                        (sign_extend(a, bits).wrapping_neg() as u64) & mask(bits)
                    }
                    (UnaryOp::Abs, false) => {
                        (sign_extend(a, bits).wrapping_abs() as u64) & mask(bits)
                    }
                    (UnaryOp::Not, _) => !a & mask(bits),
                    (UnaryOp::Neg, true) => a ^ (1 << (bits - 1)),
                    (UnaryOp::Abs, true) => a & !(1 << (bits - 1)),
                    (UnaryOp::SqrtRn, _) if *ty == Type::F64 => f64::from_bits(a).sqrt().to_bits(),
                    (UnaryOp::SqrtRn | UnaryOp::SqrtApprox, _) => of_f32(f32_of(a).sqrt()),
                    (UnaryOp::RsqrtApprox, _) => of_f32(1.0 / f32_of(a).sqrt()),
                    (UnaryOp::RcpRn | UnaryOp::RcpApprox, _) => of_f32(1.0 / f32_of(a)),
                };
                self.set(t, *dst, value);
            }
            Op::Setp { cmp, ty, dst, a, b } => {
                let (a, b) = (read(self, a, *ty)?, read(self, b, *ty)?);
                self.set(t, *dst, u64::from(compare(*cmp, *ty, a, b)));
            }
            Op::Selp {
                ty,
                dst,
                a,
                b,
                pred,
            } => {
                let chosen = if read(self, pred, Type::Pred)? == 1 {
                    read(self, a, *ty)?
                } else {
                    read(self, b, *ty)?
                };
                self.set(t, *dst, chosen);
            }
            Op::Cvt {
                rounding,
                to,
                from,
                dst,
                src,
            } => {
                let value = read(self, src, *from)?;
                let converted = convert(*rounding, *to, *from, value).ok_or_else(|| {
                    self.fault(
                        t,
                        instruction,
                        Fault::Unsupported,
                        "integer too large for an exact conversion to a 16-bit float",
                    )
                })?;
                self.set(t, *dst, converted);
            }
            Op::Ld {
                space,
                non_coherent,
                ty,
                dst,
                addr,
            } => {
                // The parser admits one, two or four elements of at most 8 bytes.
                let size = ty.bytes() as usize;
                let mut buffer = [0u8; MAX_ACCESS];
                let bytes = &mut buffer[..size * dst.len()];
                self.load(t, *space, *non_coherent, addr, bytes, instruction)?;
                for (reg, chunk) in dst.iter().zip(bytes.chunks_exact(size)) {
                    // Little-endian, byte by byte (a copy into a u64 buffer stalls the load).
                    let value = chunk.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b));
                    self.set(t, *reg, value);
                }
            }
            Op::St {
                space,
                ty,
                addr,
                src,
            } => {
                // As for loads: at most four elements of 8 bytes.
                let size = ty.bytes() as usize;
                let mut buffer = [0u8; MAX_ACCESS];
                for (operand, chunk) in src.iter().zip(buffer.chunks_exact_mut(size)) {
                    chunk.copy_from_slice(&read(self, operand, *ty)?.to_le_bytes()[..size]);
                }
                self.store(t, *space, addr, &buffer[..size * src.len()], instruction)?;
            }
            Op::AtomAdd { ty, dst, addr, src } => {
                let addend = read(self, src, *ty)?;
                let mut old = [0u8; 4];
                self.load(t, Space::Global, false, addr, &mut old, instruction)?;
                let old = u64::from(u32::from_le_bytes(old));
                let new = match ty {
                    Type::F32 => of_f32(f32_of(old) + f32_of(addend)),
                    _ => (old + addend) & mask(32),
                };
                self.store(
                    t,
                    Space::Global,
                    addr,
                    &(new as u32).to_le_bytes(),
                    instruction,
                )?;
                if let Some(dst) = dst {
                    self.set(t, *dst, old);
                }
            }
            Op::Fence => {}
            Op::Bra { target } => self.pcs[t] = *target,
            Op::Exit => self.states[t] = State::Exited,
            Op::BarSync { .. } | Op::BarWarpSync { .. } | Op::Shfl { .. } => {
                unreachable!("warp collectives run in step")
            }
        }
        Ok(())
    }

    /// The byte address an instruction's address operand names, for thread `t`.
    fn address(
        &self,
        t: usize,
        space: Space,
        addr: &Address,
        instruction: &Instruction,
    ) -> Result<u64> {
        let base = match (addr.base, space) {
            (AddressBase::Reg(reg), Space::Global | Space::Shared) => self.reg(t, reg),
            (AddressBase::Param(offset), Space::Param) => u64::from(offset),
            (AddressBase::Shared(offset), Space::Shared) => u64::from(offset),
            _ => {
                return Err(self.fault(
                    t,
                    instruction,
                    Fault::Unsupported,
                    "this address form is not supported in this state space",
                ));
            }
        };
        // An address that wraps past either end of the 64-bit space points nowhere.
        base.checked_add_signed(addr.offset).ok_or_else(|| {
            self.fault(
                t,
                instruction,
                Fault::OutOfBounds,
                format!("address {base:#x} {:+} overflows 64 bits", addr.offset),
            )
        })
    }

    fn check_alignment(
        &self,
        t: usize,
        address: u64,
        len: u64,
        instruction: &Instruction,
    ) -> Result<()> {
        if !address.is_multiple_of(len) {
            return Err(self.fault(
                t,
                instruction,
                Fault::Misaligned,
                format!("{len}-byte access at {address:#x} is not {len}-byte aligned"),
            ));
        }
        Ok(())
    }

    /// The allocation and byte range of a global access, after the alignment and bounds checks.
    fn global_range(
        &self,
        t: usize,
        address: u64,
        len: u64,
        instruction: &Instruction,
    ) -> Result<(usize, std::ops::Range<usize>)> {
        self.check_alignment(t, address, len, instruction)?;
        match self.device.locate(address, len) {
            Some((index, offset)) => Ok((index, offset..offset + len as usize)),
            None => Err(self.fault(
                t,
                instruction,
                Fault::OutOfBounds,
                format!("global access of {len} bytes at {address:#x} is outside every allocation"),
            )),
        }
    }

    fn shared_range(
        &self,
        t: usize,
        address: u64,
        len: u64,
        instruction: &Instruction,
    ) -> Result<std::ops::Range<usize>> {
        if address
            .checked_add(len)
            .is_none_or(|end| end > self.shared.len() as u64)
        {
            return Err(self.fault(
                t,
                instruction,
                Fault::OutOfBounds,
                format!(
                    "shared access of {len} bytes at {address:#x} is outside the CTA's {} bytes",
                    self.shared.len()
                ),
            ));
        }
        Ok(address as usize..(address + len) as usize)
    }

    /// Race check and bookkeeping for thread `t` touching the shared words of `range`.
    fn track_shared(
        &mut self,
        t: usize,
        range: std::ops::Range<usize>,
        write: bool,
        instruction: &Instruction,
    ) -> Result<()> {
        let warp = t / WARP;
        let now = Access {
            valid: true,
            thread: t as u32,
            epoch: self.epoch,
            warp_sync: self.warp_syncs[warp],
        };
        let conflicts = |other: &Access| {
            other.valid
                && other.epoch == now.epoch
                && other.thread != now.thread
                && !(other.thread as usize / WARP == warp && other.warp_sync != now.warp_sync)
        };
        for word in range.start / 4..range.end.div_ceil(4) {
            let history = &mut self.history[word];
            let clash = if write {
                [history.write, history.reads[0], history.reads[1]]
                    .into_iter()
                    .find(|a| conflicts(a))
            } else {
                Some(history.write).filter(|a| conflicts(a))
            };
            if let Some(other) = clash {
                let kind = if other.thread == history.write.thread
                    && history.write.valid
                    && history.write.epoch == now.epoch
                {
                    "write"
                } else {
                    "read"
                };
                let other_tid = self.tid(other.thread as usize);
                return Err(self.fault(
                    t,
                    instruction,
                    Fault::SharedRace,
                    format!("{} of shared word {:#x} races with a {kind} by thread {other_tid:?} since the last barrier", if write { "write" } else { "read" }, word * 4),
                ));
            }
            if write {
                history.write = now;
            } else if !(history.reads[0].valid
                && history.reads[0].epoch == now.epoch
                && history.reads[0].thread == now.thread)
            {
                // Keep the latest reader and one other distinct reader of this epoch.
                let keep = if history.reads[0].valid && history.reads[0].epoch == now.epoch {
                    history.reads[0]
                } else {
                    Access::default()
                };
                history.reads = [now, keep];
            }
        }
        Ok(())
    }

    /// Loads `out.len()` bytes (at most [`MAX_ACCESS`]) at `addr` into `out`.
    fn load(
        &mut self,
        t: usize,
        space: Space,
        non_coherent: bool,
        addr: &Address,
        out: &mut [u8],
        instruction: &Instruction,
    ) -> Result<()> {
        let len = out.len() as u64;
        let address = self.address(t, space, addr, instruction)?;
        match space {
            Space::Param => {
                if address
                    .checked_add(len)
                    .is_none_or(|end| end > self.params.len() as u64)
                {
                    return Err(self.fault(
                        t,
                        instruction,
                        Fault::OutOfBounds,
                        format!("parameter read of {len} bytes at offset {address}"),
                    ));
                }
                out.copy_from_slice(&self.params[address as usize..(address + len) as usize]);
                Ok(())
            }
            Space::Shared => {
                self.check_alignment(t, address, len, instruction)?;
                let range = self.shared_range(t, address, len, instruction)?;
                if let Some(byte) = range.clone().find(|&b| !self.shared_written[b]) {
                    return Err(self.fault(
                        t,
                        instruction,
                        Fault::UninitializedShared,
                        format!("read of shared byte {byte:#x}, which no thread has written"),
                    ));
                }
                self.track_shared(t, range.clone(), false, instruction)?;
                out.copy_from_slice(&self.shared[range]);
                Ok(())
            }
            Space::Global => {
                let (index, range) = self.global_range(t, address, len, instruction)?;
                let flags = &self.device.allocations[index].flags[range.clone()];
                if non_coherent && flags.iter().any(|f| f & WRITTEN != 0) {
                    return Err(self.fault(
                        t,
                        instruction,
                        Fault::NonCoherentConflict,
                        format!("ld.global.nc of {address:#x}, which this launch has written"),
                    ));
                }
                let allocation = &mut self.device.allocations[index];
                if non_coherent {
                    allocation.flags[range.clone()]
                        .iter_mut()
                        .for_each(|f| *f |= NC_READ);
                }
                out.copy_from_slice(&allocation.bytes[range]);
                Ok(())
            }
        }
    }

    fn store(
        &mut self,
        t: usize,
        space: Space,
        addr: &Address,
        bytes: &[u8],
        instruction: &Instruction,
    ) -> Result<()> {
        let address = self.address(t, space, addr, instruction)?;
        let len = bytes.len() as u64;
        match space {
            Space::Param => Err(self.fault(
                t,
                instruction,
                Fault::Unsupported,
                "stores to .param are not supported",
            )),
            Space::Shared => {
                self.check_alignment(t, address, len, instruction)?;
                let range = self.shared_range(t, address, len, instruction)?;
                self.track_shared(t, range.clone(), true, instruction)?;
                self.shared[range.clone()].copy_from_slice(bytes);
                self.shared_written[range].fill(true);
                Ok(())
            }
            Space::Global => {
                let (index, range) = self.global_range(t, address, len, instruction)?;
                if self.device.allocations[index].flags[range.clone()]
                    .iter()
                    .any(|f| f & NC_READ != 0)
                {
                    return Err(self.fault(
                        t,
                        instruction,
                        Fault::NonCoherentConflict,
                        format!(
                            "store to {address:#x}, which this launch has read through ld.global.nc"
                        ),
                    ));
                }
                let allocation = &mut self.device.allocations[index];
                allocation.bytes[range.clone()].copy_from_slice(bytes);
                allocation.flags[range]
                    .iter_mut()
                    .for_each(|f| *f |= WRITTEN);
                Ok(())
            }
        }
    }
}

fn wide_type(ty: Type) -> Type {
    match ty {
        Type::U16 => Type::U32,
        Type::S16 => Type::S32,
        Type::U32 => Type::U64,
        _ => Type::S64,
    }
}

/// Integer arithmetic on the low `ty.bits()` bits; `None` for division by zero.
fn integer_binary(op: BinaryOp, ty: Type, a: u64, b: u64) -> Option<u64> {
    let w = ty.bits();
    let m = mask(w);
    let (sa, sb) = (sign_extend(a, w), sign_extend(b, w));
    let signed = ty.is_signed();
    Some(match op {
        BinaryOp::Add => a.wrapping_add(b) & m,
        BinaryOp::Sub => a.wrapping_sub(b) & m,
        BinaryOp::Mul => a.wrapping_mul(b) & m,
        BinaryOp::MulHi if signed => ((i128::from(sa) * i128::from(sb)) >> w) as u64 & m,
        BinaryOp::MulHi => ((u128::from(a) * u128::from(b)) >> w) as u64 & m,
        BinaryOp::MulWide if signed => (i128::from(sa) * i128::from(sb)) as u64 & mask(2 * w),
        BinaryOp::MulWide => (u128::from(a) * u128::from(b)) as u64 & mask(2 * w),
        BinaryOp::Div | BinaryOp::Rem if b == 0 => return None,
        BinaryOp::Div if signed => (sa.wrapping_div(sb) as u64) & m,
        BinaryOp::Div => a / b,
        BinaryOp::Rem if signed => (sa.wrapping_rem(sb) as u64) & m,
        BinaryOp::Rem => a % b,
        // PTX clamps shift amounts at the operand width.
        BinaryOp::Shl => {
            if b >= u64::from(w) {
                0
            } else {
                (a << b) & m
            }
        }
        BinaryOp::Shr if signed => {
            (if b >= u64::from(w) {
                sa >> (w - 1)
            } else {
                sa >> b
            }) as u64
                & m
        }
        BinaryOp::Shr => {
            if b >= u64::from(w) {
                0
            } else {
                a >> b
            }
        }
        BinaryOp::And => a & b,
        BinaryOp::Or => a | b,
        BinaryOp::Xor => a ^ b,
        BinaryOp::Min if signed => sa.min(sb) as u64 & m,
        BinaryOp::Min => a.min(b),
        BinaryOp::Max if signed => sa.max(sb) as u64 & m,
        BinaryOp::Max => a.max(b),
    })
}

/// `f32` / `f64` arithmetic, round to nearest even (`min`/`max` return the non-NaN input).
fn float_binary(op: BinaryOp, ty: Type, a: u64, b: u64) -> u64 {
    macro_rules! apply {
        ($x:expr, $y:expr) => {
            match op {
                BinaryOp::Add => $x + $y,
                BinaryOp::Sub => $x - $y,
                BinaryOp::Mul => $x * $y,
                BinaryOp::Div => $x / $y,
                BinaryOp::Min => $x.min($y),
                BinaryOp::Max => $x.max($y),
                _ => unreachable!("the parser admits no other float binary op"),
            }
        };
    }
    match ty {
        Type::F32 => of_f32(apply!(f32_of(a), f32_of(b))),
        _ => apply!(f64::from_bits(a), f64::from_bits(b)).to_bits(),
    }
}

fn compare(cmp: Compare, ty: Type, a: u64, b: u64) -> bool {
    use std::cmp::Ordering::*;
    if ty.is_float() {
        let (x, y) = (float_value(a, ty), float_value(b, ty));
        let unordered = x.is_nan() || y.is_nan();
        let order = x.partial_cmp(&y);
        return match cmp {
            Compare::Eq => order == Some(Equal),
            Compare::Ne => !unordered && order != Some(Equal),
            Compare::Lt => order == Some(Less),
            Compare::Le => matches!(order, Some(Less | Equal)),
            Compare::Gt => order == Some(Greater),
            Compare::Ge => matches!(order, Some(Greater | Equal)),
            Compare::Equ => unordered || order == Some(Equal),
            Compare::Neu => order != Some(Equal),
            Compare::Ltu => unordered || order == Some(Less),
            Compare::Leu => unordered || matches!(order, Some(Less | Equal)),
            Compare::Gtu => unordered || order == Some(Greater),
            Compare::Geu => unordered || matches!(order, Some(Greater | Equal)),
            Compare::Num => !unordered,
            Compare::Nan => unordered,
            _ => unreachable!("the parser admits no unsigned comparison on floats"),
        };
    }
    let w = ty.bits();
    let order = if ty.is_signed() {
        sign_extend(a, w).cmp(&sign_extend(b, w))
    } else {
        a.cmp(&b)
    };
    let unsigned = a.cmp(&b);
    match cmp {
        Compare::Eq => a == b,
        Compare::Ne => a != b,
        Compare::Lt => order == Less,
        Compare::Le => order != Greater,
        Compare::Gt => order == Greater,
        Compare::Ge => order != Less,
        Compare::Lo => unsigned == Less,
        Compare::Ls => unsigned != Greater,
        Compare::Hi => unsigned == Greater,
        Compare::Hs => unsigned != Less,
        _ => unreachable!("the parser admits no float comparison on integers"),
    }
}

/// `x` rounded to the nearest bf16, ties to even, with one rounding, as `cvt.rn.bf16` does.
/// (`half::bf16::from_f64` rounds some values twice: 2.7.1 takes f32 `0xBE468001` to
/// `0xBE46`, not `0xBE47`.) `x` is first rounded to odd into `f32`, which keeps 16 bits more
/// than bf16 and the stickiness of what it drops, so the rounding to bf16 is the only one.
fn bf16_nearest(x: f64) -> half::bf16 {
    let nearest = x as f32;
    if x.is_nan() || f64::from(nearest) == x {
        return half::bf16::from_f32(nearest);
    }
    let toward_zero = if f64::from(nearest).abs() > x.abs() {
        f32::from_bits(nearest.to_bits() - 1)
    } else {
        nearest
    };
    half::bf16::from_f32(f32::from_bits(toward_zero.to_bits() | 1))
}

/// `cvt`; `None` for an integer too large to convert exactly before a 16-bit rounding.
fn convert(rounding: Option<Rounding>, to: Type, from: Type, value: u64) -> Option<u64> {
    let from_bits = from.bits();
    let integer = |v: u64| {
        if from.is_signed() {
            i128::from(sign_extend(v, from_bits))
        } else {
            i128::from(v)
        }
    };
    Some(match (to.is_float(), from.is_float()) {
        (false, false) => (integer(value) as u64) & mask(to.bits()),
        (true, true) => {
            let x = float_value(value, from);
            match to {
                Type::F16 => u64::from(half::f16::from_f64(x).to_bits()),
                Type::Bf16 => u64::from(bf16_nearest(x).to_bits()),
                Type::F32 => of_f32(x as f32),
                _ => x.to_bits(),
            }
        }
        (true, false) => {
            let n = integer(value);
            match to {
                Type::F32 => of_f32(n as f32),
                Type::F64 => (n as f64).to_bits(),
                _ => {
                    // Exact in f64 below 2^53, so the 16-bit rounding is the only one.
                    if n.unsigned_abs() > 1 << 53 {
                        return None;
                    }
                    convert(Some(Rounding::Rn), to, Type::F64, (n as f64).to_bits())?
                }
            }
        }
        (false, true) => {
            let x = float_value(value, from);
            let x = if rounding == Some(Rounding::Rni) {
                x.round_ties_even()
            } else {
                x.trunc()
            };
            let bits = to.bits();
            let (lo, hi) = if to.is_signed() {
                (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
            } else {
                (0, (1i128 << bits) - 1)
            };
            // Saturating, NaN to zero (PTX's float-to-integer cvt).
            let n = if x.is_nan() {
                0
            } else {
                (x as i128).clamp(lo, hi)
            };
            (n as u64) & mask(bits)
        }
    })
}

/// `len` copies of `value`, or a launch error if the host cannot hold them.
fn filled<T: Clone>(kernel: &Kernel, len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut items = Vec::new();
    items
        .try_reserve_exact(len)
        .map_err(|error| SimError::Launch {
            kernel: kernel.name.clone(),
            message: format!("cannot allocate the {what} of a CTA ({len} entries): {error}"),
        })?;
    items.resize(len, value);
    Ok(items)
}

/// Runs one CTA of a launch to completion. `shape` is the launch's, checked against CUDA's
/// limits; `steps` counts the launch's steps so far (see [`LaunchConfig::step_limit`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_cta(
    device: &mut Device,
    kernel: &Kernel,
    config: &LaunchConfig,
    params: &[u8],
    cta: [u32; 3],
    shape: Shape,
    steps: &mut u64,
    stats: &mut LaunchStats,
) -> Result<()> {
    let Shape {
        threads,
        shared_bytes,
    } = shape;
    let warps = threads.div_ceil(WARP);
    let registers = kernel.registers.len();
    // Setting the CTA up costs steps in proportion to its state, charged before any of it is
    // allocated. For a parsed kernel that is at most 1024 threads x MAX_KERNEL_REGISTERS x 8
    // bytes (512 MiB) plus 227 KiB of shared memory and its shadow state; saturating all the
    // same.
    let per_thread = (registers as u64)
        .saturating_mul(size_of::<u64>() as u64)
        .saturating_add((size_of::<usize>() + size_of::<State>()) as u64);
    let state_bytes = (threads as u64)
        .saturating_mul(per_thread)
        .saturating_add(
            (shared_bytes * 2 + shared_bytes.div_ceil(4) * size_of::<WordHistory>()) as u64,
        )
        .saturating_add((warps * size_of::<u32>()) as u64);
    *steps = steps.saturating_add(1 + state_bytes / SETUP_BYTES_PER_STEP);
    if *steps > config.step_limit {
        return Err(SimError::Fault {
            kernel: kernel.name.clone(),
            fault: Fault::RunAway,
            cta,
            thread: [0; 3],
            line: kernel.instructions.first().map_or(0, |i| i.line),
            opcode: "(CTA setup)".into(),
            message: format!(
                "step limit of {} exceeded setting up this CTA ({state_bytes} bytes of state)",
                config.step_limit
            ),
        });
    }
    let mut state = Cta {
        device,
        kernel,
        config,
        params,
        cta,
        threads,
        registers,
        regs: filled(
            kernel,
            threads.saturating_mul(registers),
            0,
            "register file",
        )?,
        pcs: filled(kernel, threads, 0, "program counters")?,
        states: filled(kernel, threads, State::Running, "thread states")?,
        shared: filled(kernel, shared_bytes, 0, "shared memory")?,
        shared_written: filled(kernel, shared_bytes, false, "shared memory")?,
        history: filled(
            kernel,
            shared_bytes.div_ceil(4),
            WordHistory::default(),
            "race detector",
        )?,
        epoch: 0,
        warp_syncs: filled(kernel, warps, 0, "warp state")?,
        steps: *steps,
    };
    if kernel.instructions.is_empty() {
        return Ok(());
    }
    loop {
        for warp in 0..warps {
            let ran = state.run_warp(warp, stats);
            *steps = state.steps;
            ran?;
        }
        // Every live thread now waits at a barrier, or all have exited.
        let waiting: Vec<usize> = (0..threads)
            .filter(|&t| state.states[t] == State::AtBarrier)
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let deadlock = |message: String| SimError::Deadlock {
            kernel: kernel.name.clone(),
            cta,
            message,
        };
        // A waiting thread has executed its bar.sync, so its program counter is past it (>= 1).
        let exited = state.states.iter().filter(|&&s| s == State::Exited).count();
        if exited > 0 {
            return Err(deadlock(format!(
                "{} threads wait at bar.sync (line {}) but {exited} threads of the CTA have exited",
                waiting.len(),
                kernel.instructions[state.pcs[waiting[0]] - 1].line
            )));
        }
        let lines: std::collections::BTreeSet<usize> = waiting
            .iter()
            .map(|&t| kernel.instructions[state.pcs[t] - 1].line)
            .collect();
        if lines.len() > 1 {
            return Err(deadlock(format!(
                "threads wait at different bar.sync instructions (lines {lines:?})"
            )));
        }
        // The race detector tells barrier intervals apart by this count: it must not wrap.
        let Some(epoch) = state.epoch.checked_add(1) else {
            let barrier = &kernel.instructions[state.pcs[waiting[0]] - 1];
            return Err(state.fault(
                waiting[0],
                barrier,
                Fault::Unsupported,
                "more than 2^32 barrier intervals in one CTA",
            ));
        };
        state.epoch = epoch;
        for t in waiting {
            state.states[t] = State::Running;
        }
    }
}

/// A `ld`/`st` of two or four elements in global memory (`.v2`, `.v4`).
fn is_global_vector_access(op: &Op) -> bool {
    match op {
        Op::Ld { space, dst, .. } => *space == Space::Global && dst.len() > 1,
        Op::St { space, src, .. } => *space == Space::Global && src.len() > 1,
        _ => false,
    }
}
