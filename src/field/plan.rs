//! Read plans: which Modbus requests read a device's points in one poll.
//!
//! Points are grouped per register kind (one read function each) and, in address order,
//! joined into one request while the request stays within the limits: at most
//! `max_registers` registers (125 by the protocol) or `max_bits` bits (2000), and no
//! more than `max_gap` unused registers (bits) between two joined points. Joining in
//! address order is optimal here: a request is a contiguous range, so any plan can be
//! rearranged into one whose requests are consecutive runs of the sorted points, and
//! greedily extending the current run never makes a later run longer (a property test
//! checks this against an exhaustive search).
//!
//! A device may refuse a joined request (exception 02 "illegal data address" because a
//! gap holds a register it does not implement, 03 or 04 on some meters). The bus then
//! [`ReadPlan::split`]s that block in two at a point boundary and reads the halves; the
//! split stays in the plan, so the next poll does not pay for the failed request again.
//! A block of one point cannot be split; its exception becomes that point's quality.
//!
//! Invariant: every point is in exactly one block, and a block's range covers each of
//! its points.

use std::fmt::Write as _;
use std::time::Duration;

use super::decode::RegisterKind;

/// Where one point sits: what a plan needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointSpan {
    pub kind: RegisterKind,
    /// 0-based protocol address.
    pub address: u16,
    /// Registers (or bits) it occupies, ≥ 1.
    pub width: u16,
}

impl PointSpan {
    fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.width) - 1
    }
}

/// Limits of one device's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_gap: u16,
    pub max_registers: u16,
    pub max_bits: u16,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_gap: 10,
            max_registers: 125,
            max_bits: 2000,
        }
    }
}

impl Limits {
    fn max_for(&self, kind: RegisterKind) -> u32 {
        u32::from(if kind.is_bit() {
            self.max_bits
        } else {
            self.max_registers
        })
        .max(1)
    }
}

/// One read request and the points it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
    /// Indexes into the device's point list, in address order.
    pub points: Vec<usize>,
}

impl Block {
    /// Offset of a point's first register (bit) inside this block's answer.
    pub fn offset_of(&self, span: &PointSpan) -> usize {
        usize::from(span.address - self.start)
    }
}

/// The requests of one device's poll, in the order they are issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadPlan {
    pub blocks: Vec<Block>,
}

impl ReadPlan {
    /// The fewest requests that read `points` within `limits`. Points wider than a
    /// request's limit get a block of their own (validation prevents that).
    pub fn build(points: &[PointSpan], limits: Limits) -> ReadPlan {
        let mut order: Vec<usize> = (0..points.len()).collect();
        order.sort_by_key(|&i| (points[i].kind, points[i].address, points[i].width));
        let mut blocks: Vec<Block> = Vec::new();
        let mut current: Option<(RegisterKind, u32, u32, Vec<usize>)> = None;
        for i in order {
            let p = &points[i];
            if let Some((kind, start, end, members)) = &mut current {
                let new_end = (*end).max(p.end());
                let gap = i64::from(p.address) - i64::from(*end) - 1;
                if *kind == p.kind
                    && gap <= i64::from(limits.max_gap)
                    && new_end - *start < limits.max_for(p.kind)
                {
                    *end = new_end;
                    members.push(i);
                    continue;
                }
            }
            if let Some(done) = current.take() {
                blocks.push(make_block(done));
            }
            current = Some((p.kind, u32::from(p.address), p.end(), vec![i]));
        }
        if let Some(done) = current {
            blocks.push(make_block(done));
        }
        ReadPlan { blocks }
    }

    /// The fewest requests that read the points `members` (indexes into `points`) within
    /// `limits`; blocks name points by their index in `points`, as [`Self::build`] does.
    pub fn build_for(points: &[PointSpan], members: &[usize], limits: Limits) -> ReadPlan {
        let subset: Vec<PointSpan> = members.iter().map(|&i| points[i]).collect();
        let mut plan = ReadPlan::build(&subset, limits);
        for b in &mut plan.blocks {
            for p in &mut b.points {
                *p = members[*p];
            }
        }
        plan
    }

    /// Splits block `index` in two at the point boundary nearest its middle; the halves
    /// take its place (first half at `index`). Returns false for a block of one point
    /// (or of points that all start at one address), which cannot be split.
    pub fn split(&mut self, index: usize, points: &[PointSpan]) -> bool {
        let Some(block) = self.blocks.get(index) else {
            return false;
        };
        let mid_addr = u32::from(block.start) + u32::from(block.count) / 2;
        // Candidate cut positions: between members whose start addresses differ.
        let cuts: Vec<usize> = (1..block.points.len())
            .filter(|&k| points[block.points[k]].address != points[block.points[k - 1]].address)
            .collect();
        let Some(&cut) = cuts.iter().min_by_key(|&&k| {
            (i64::from(points[block.points[k]].address) - i64::from(mid_addr)).abs()
        }) else {
            return false;
        };
        let kind = block.kind;
        let (left, right) = block.points.split_at(cut);
        let span = |members: &[usize]| {
            let start = members
                .iter()
                .map(|&i| u32::from(points[i].address))
                .min()
                .unwrap_or(0);
            let end = members.iter().map(|&i| points[i].end()).max().unwrap_or(0);
            make_block((kind, start, end, members.to_vec()))
        };
        let (a, b) = (span(left), span(right));
        self.blocks.splice(index..=index, [a, b]);
        true
    }

    pub fn requests(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes on the wire of one poll (requests and answers, RTU framing).
    pub fn wire_bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| {
                // Request: unit, function, address (2), count (2), CRC (2) = 8 bytes.
                // Response: unit, function, byte count, data, CRC (2) = 5 + data bytes.
                let data = if b.kind.is_bit() {
                    usize::from(b.count).div_ceil(8)
                } else {
                    usize::from(b.count) * 2
                };
                8 + 5 + data
            })
            .sum()
    }

    /// Estimated time on the wire of one poll at `baud` with `bits_per_char`, plus the
    /// inter-frame silence around each frame. The device's own think time is not
    /// included (it is not knowable from here).
    pub fn bus_time(&self, baud: u32, bits_per_char: u32, silence: Duration) -> Duration {
        let char_time = f64::from(bits_per_char) / f64::from(baud.max(1));
        let total = self.wire_bytes() as f64 * char_time
            + self.blocks.len() as f64 * 2.0 * silence.as_secs_f64();
        Duration::from_secs_f64(total)
    }

    /// One line per request: `fc03 holding 0..=29 (30 registers, 12 points)`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for b in &self.blocks {
            let unit = if b.kind.is_bit() { "bits" } else { "registers" };
            let _ = writeln!(
                out,
                "fc{:02} {} {}..={} ({} {unit}, {} point{})",
                b.kind.function_code(),
                b.kind.name(),
                b.start,
                u32::from(b.start) + u32::from(b.count) - 1,
                b.count,
                b.points.len(),
                if b.points.len() == 1 { "" } else { "s" },
            );
        }
        out
    }
}

fn make_block((kind, start, end, points): (RegisterKind, u32, u32, Vec<usize>)) -> Block {
    Block {
        kind,
        start: u16::try_from(start).unwrap_or(u16::MAX),
        count: u16::try_from(end - start + 1).unwrap_or(u16::MAX),
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reg(address: u16, width: u16) -> PointSpan {
        PointSpan {
            kind: RegisterKind::Holding,
            address,
            width,
        }
    }

    #[test]
    fn adjacent_and_near_points_join_far_ones_do_not() {
        let points = [reg(0, 2), reg(2, 2), reg(10, 1), reg(30, 2)];
        let plan = ReadPlan::build(&points, Limits::default());
        assert_eq!(plan.requests(), 2);
        assert_eq!((plan.blocks[0].start, plan.blocks[0].count), (0, 11));
        assert_eq!(plan.blocks[0].points, vec![0, 1, 2]);
        assert_eq!((plan.blocks[1].start, plan.blocks[1].count), (30, 2));
    }

    #[test]
    fn kinds_never_share_a_request() {
        let points = [
            reg(0, 1),
            PointSpan {
                kind: RegisterKind::Input,
                address: 1,
                width: 1,
            },
            PointSpan {
                kind: RegisterKind::Coil,
                address: 0,
                width: 1,
            },
            PointSpan {
                kind: RegisterKind::Coil,
                address: 1999,
                width: 1,
            },
            PointSpan {
                kind: RegisterKind::Coil,
                address: 2000,
                width: 1,
            },
        ];
        let plan = ReadPlan::build(
            &points,
            Limits {
                max_gap: 2000,
                ..Limits::default()
            },
        );
        let kinds: Vec<_> = plan
            .blocks
            .iter()
            .map(|b| (b.kind, b.start, b.count))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (RegisterKind::Coil, 0, 2000),
                (RegisterKind::Coil, 2000, 1),
                (RegisterKind::Input, 1, 1),
                (RegisterKind::Holding, 0, 1),
            ]
        );
    }

    #[test]
    fn requests_respect_125_registers_and_a_lower_device_limit() {
        let points: Vec<PointSpan> = (0..100).map(|i| reg(i * 2, 2)).collect();
        let plan = ReadPlan::build(&points, Limits::default());
        assert_eq!(plan.requests(), 2);
        assert_eq!(plan.blocks[0].count, 124);
        let small = ReadPlan::build(
            &points,
            Limits {
                max_registers: 40,
                ..Limits::default()
            },
        );
        assert_eq!(small.requests(), 5);
        assert!(small.blocks.iter().all(|b| b.count <= 40));
    }

    #[test]
    fn zero_gap_joins_only_touching_points() {
        let points = [reg(0, 1), reg(1, 1), reg(3, 1)];
        let plan = ReadPlan::build(
            &points,
            Limits {
                max_gap: 0,
                ..Limits::default()
            },
        );
        assert_eq!(plan.requests(), 2);
    }

    #[test]
    fn bits_of_one_register_share_it() {
        let points = [reg(20, 1), reg(20, 1), reg(21, 1)];
        let mut plan = ReadPlan::build(&points, Limits::default());
        assert_eq!(plan.requests(), 1);
        assert!(plan.split(0, &points));
        assert_eq!(plan.blocks[0].points, vec![0, 1]);
        assert!(
            !plan.split(0, &points),
            "two bits of one register cannot be split"
        );
    }

    #[test]
    fn split_halves_cover_their_points_and_stop_at_one_point() {
        let points = [reg(0, 2), reg(2, 1), reg(5, 4), reg(9, 1)];
        let mut plan = ReadPlan::build(&points, Limits::default());
        assert_eq!(plan.requests(), 1);
        assert!(plan.split(0, &points));
        assert_eq!(plan.requests(), 2);
        assert_eq!((plan.blocks[0].start, plan.blocks[0].count), (0, 3));
        assert_eq!((plan.blocks[1].start, plan.blocks[1].count), (5, 5));
        assert!(plan.split(0, &points));
        assert!(plan.split(2, &points));
        assert_eq!(plan.requests(), 4);
        for i in 0..4 {
            assert!(!plan.split(i, &points));
        }
        check_cover(&plan, &points);
    }

    #[test]
    fn bus_time_counts_frames_and_silence() {
        let plan = ReadPlan::build(&[reg(0, 10)], Limits::default());
        // 8 + 5 + 20 = 33 bytes × 11 bits at 9600 baud + 2 × 4.01 ms.
        let silence = Duration::from_secs_f64(3.5 * 11.0 / 9600.0);
        let t = plan.bus_time(9600, 11, silence).as_secs_f64();
        let want = 33.0 * 11.0 / 9600.0 + 2.0 * silence.as_secs_f64();
        assert!((t - want).abs() < 1e-9, "{t} vs {want}");
        assert!(plan
            .describe()
            .starts_with("fc03 holding 0..=9 (10 registers, 1 point)"));
    }

    fn check_cover(plan: &ReadPlan, points: &[PointSpan]) {
        let mut seen = vec![0; points.len()];
        for b in &plan.blocks {
            for &i in &b.points {
                seen[i] += 1;
                let p = &points[i];
                assert_eq!(p.kind, b.kind);
                assert!(p.address >= b.start);
                assert!(p.end() < u32::from(b.start) + u32::from(b.count));
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
    }

    /// The fewest blocks over all partitions of the sorted points into consecutive runs.
    fn optimum(points: &[PointSpan], limits: Limits) -> usize {
        let mut sorted = points.to_vec();
        sorted.sort_by_key(|p| (p.kind, p.address, p.width));
        let n = sorted.len();
        let mut best = vec![usize::MAX; n + 1];
        best[0] = 0;
        for j in 1..=n {
            for i in 0..j {
                if best[i] == usize::MAX {
                    continue;
                }
                let run = &sorted[i..j];
                let ok = run.iter().all(|p| p.kind == run[0].kind)
                    && run.windows(2).all(|w| {
                        let end = run[..]
                            .iter()
                            .take_while(|q| q.address <= w[0].address)
                            .map(PointSpan::end)
                            .max()
                            .unwrap_or(0);
                        i64::from(w[1].address) - i64::from(end) - 1 <= i64::from(limits.max_gap)
                    })
                    && run.iter().map(PointSpan::end).max().unwrap_or(0)
                        - u32::from(run[0].address)
                        < limits.max_for(run[0].kind);
                if ok {
                    best[j] = best[j].min(best[i] + 1);
                }
            }
        }
        best[n]
    }

    proptest! {
        #[test]
        fn greedy_plan_is_minimal_and_covers_every_point(
            raw in prop::collection::vec((0u16..3, 0u16..300, 1u16..5), 1..10),
            max_gap in 0u16..20,
            max_registers in 4u16..40,
        ) {
            let points: Vec<PointSpan> = raw.iter().map(|&(k, a, w)| PointSpan {
                kind: [RegisterKind::Holding, RegisterKind::Input, RegisterKind::Coil][usize::from(k)],
                address: a,
                width: if k == 2 { 1 } else { w },
            }).collect();
            let limits = Limits { max_gap, max_registers, max_bits: max_registers * 8 };
            let plan = ReadPlan::build(&points, limits);
            check_cover(&plan, &points);
            for b in &plan.blocks {
                prop_assert!(u32::from(b.count) <= limits.max_for(b.kind));
            }
            prop_assert_eq!(plan.requests(), optimum(&points, limits));
        }
    }
}
