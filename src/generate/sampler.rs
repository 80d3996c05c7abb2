//! Turns the logits of the last position into one token id: first the logits processors
//! (the grammar's mask, then the repetition penalty), then temperature, top-k, top-p and
//! min-p, then the draw.

use super::constraint::TokenMask;
use crate::protocol::SamplingParams;

/// SplitMix64: tiny, fast, and the same sequence on every platform for a given seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Per-request sampler; owns its scratch buffers so the decode loop does not allocate.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
    /// Per token id, the last call that penalized it: each seen id is penalized once per
    /// step without a set built every step.
    penalized_at: Vec<u32>,
    step: u32,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Sampler {
            params,
            rng: Rng::new(seed),
            candidates: Vec::new(),
            penalized_at: Vec::new(),
            step: 0,
        }
    }

    /// Picks the next token. `history` is every token so far (prompt and generated),
    /// the set that the repetition penalty applies to; `mask`, when given, is the set of
    /// tokens allowed at all: no other token is ever picked, whatever its logit.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], mask: Option<&TokenMask>) -> u32 {
        if let Some(mask) = mask {
            mask.apply(logits);
        }
        if self.params.repetition_penalty != 1.0 {
            self.apply_repetition_penalty(logits, history);
        }
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        self.keep_candidates(logits);
        let total: f32 = self.candidates.iter().map(|&(_, p)| p).sum();
        let mut target = self.rng.next_f32() * total;
        for &(id, p) in &self.candidates {
            if target < p {
                return id;
            }
            target -= p;
        }
        // Rounding left `target` past the end: the most likely candidate, which a mask
        // allows (a masked token has probability 0 and sorts last).
        self.candidates
            .first()
            .map(|&(id, _)| id)
            .unwrap_or_else(|| argmax(logits))
    }

    /// CTRL-style penalty, once per distinct seen token: it becomes less likely whatever
    /// the sign of its logit.
    fn apply_repetition_penalty(&mut self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if self.penalized_at.len() < logits.len() {
            self.penalized_at.resize(logits.len(), 0);
        }
        self.step = self.step.wrapping_add(1);
        if self.step == 0 {
            // Wrapped: stale marks could equal the new step.
            self.penalized_at.fill(0);
            self.step = 1;
        }
        for &id in history {
            let id = id as usize;
            if id < logits.len() && self.penalized_at[id] != self.step {
                self.penalized_at[id] = self.step;
                let l = &mut logits[id];
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }

    /// Fills `candidates` with (id, unnormalized probability) of the tokens that survive
    /// temperature, top-k, top-p and min-p, most likely first.
    pub fn keep_candidates(&mut self, logits: &[f32]) {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.candidates.clear();
        self.candidates.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, ((l - max) * inv_t).exp())),
        );
        let by_prob_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        let k = p.top_k as usize;
        if k > 0 && k < self.candidates.len() {
            // A partial sort: only the top k need ordering, not the whole vocabulary.
            self.candidates.select_nth_unstable_by(k - 1, by_prob_desc);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_prob_desc);
        let total: f32 = self.candidates.iter().map(|&(_, q)| q).sum();
        if p.min_p > 0.0 {
            // The most likely token has unnormalized probability 1 after max-subtraction.
            let floor = p.min_p * self.candidates[0].1;
            let keep = self
                .candidates
                .iter()
                .take_while(|&&(_, q)| q >= floor)
                .count()
                .max(1);
            self.candidates.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = 0;
            for &(_, q) in &self.candidates {
                keep += 1;
                cumulative += q / total;
                if cumulative >= p.top_p {
                    break;
                }
            }
            self.candidates.truncate(keep.max(1));
        }
    }

    #[cfg(test)]
    fn candidate_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.candidates.iter().map(|&(id, _)| id).collect();
        ids.sort_unstable();
        ids
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty: 1.0,
            seed: Some(7),
        }
    }

    // Probabilities at temperature 1 for these logits: ln of 0.5, 0.25, 0.15, 0.1.
    fn logits() -> Vec<f32> {
        vec![0.1f32.ln(), 0.5f32.ln(), 0.15f32.ln(), 0.25f32.ln()]
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(params(0.0, 0, 1.0, 0.0));
        assert_eq!(s.sample(&mut logits(), &[], None), 1);
    }

    #[test]
    fn top_k_keeps_exactly_the_k_most_likely() {
        let mut s = Sampler::new(params(1.0, 2, 1.0, 0.0));
        s.keep_candidates(&logits());
        assert_eq!(s.candidate_ids(), vec![1, 3]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        let mut s = Sampler::new(params(1.0, 0, 0.7, 0.0));
        s.keep_candidates(&logits());
        assert_eq!(s.candidate_ids(), vec![1, 3]);
        let mut s = Sampler::new(params(1.0, 0, 0.8, 0.0));
        s.keep_candidates(&logits());
        assert_eq!(s.candidate_ids(), vec![1, 2, 3]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // 0.15 / 0.5 = 0.3 survives a floor of 0.25; 0.1 / 0.5 = 0.2 does not.
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.25));
        s.keep_candidates(&logits());
        assert_eq!(s.candidate_ids(), vec![1, 2, 3]);
    }

    #[test]
    fn same_seed_gives_the_same_tokens() {
        let run = |seed| {
            let mut p = params(1.0, 0, 1.0, 0.0);
            p.seed = Some(seed);
            let mut s = Sampler::new(p);
            (0..64)
                .map(|_| s.sample(&mut logits(), &[], None))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0));
        let mut counts = [0u32; 4];
        for _ in 0..20_000 {
            counts[s.sample(&mut logits(), &[], None) as usize] += 1;
        }
        let share = counts[1] as f32 / 20_000.0;
        assert!(
            (share - 0.5).abs() < 0.02,
            "token 1 drawn {share} of the time"
        );
    }

    #[test]
    fn repetition_penalty_lowers_seen_tokens_of_either_sign() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0, 0, 1.0, 0.0)
        });
        let mut l = vec![2.0, -2.0, 1.0];
        s.apply_repetition_penalty(&mut l, &[0, 1, 0]);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
        // A second step penalizes again, once.
        s.apply_repetition_penalty(&mut l, &[0, 0]);
        assert_eq!(l, vec![0.5, -4.0, 1.0]);
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 4.0,
            ..params(0.0, 0, 1.0, 0.0)
        });
        assert_eq!(s.sample(&mut [2.0, 1.0], &[0], None), 1);
    }
}
