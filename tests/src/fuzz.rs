//! Input mutation for the seeded fuzz smoke tests (the bodies live next to the code they test:
//! `flightnode_agent::fuzzing`, `flightnode_hub::heartbeat::fuzzing`; the long runs are `fuzz/run.sh`).

use rand::Rng;

/// One to seven random edits of `seed`: bit flips, truncation, inserted bytes, a duplicated
/// slice (repeated fields, overriding scalars), random tails.
pub fn mutate(rng: &mut rand::rngs::StdRng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..rng.random_range(1..8) {
        match rng.random_range(0..5) {
            0 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if !v.is_empty() => {
                let i = rng.random_range(0..v.len());
                v.truncate(i);
            }
            2 => {
                let i = rng.random_range(0..=v.len());
                let b: u8 = rng.random();
                v.insert(i, b);
            }
            3 if !v.is_empty() => {
                // Duplicate a slice: repeated fields and overriding scalars.
                let a = rng.random_range(0..v.len());
                let b = rng.random_range(a..v.len().min(a + 64) + 1).min(v.len());
                let chunk = v[a..b].to_vec();
                v.extend_from_slice(&chunk);
            }
            _ => {
                let n = rng.random_range(0..64);
                v.extend((0..n).map(|_| rng.random::<u8>()));
            }
        }
    }
    v
}
