//! The quantized kernels behind a C interface, so that a harness can run
//! them on instruction sets this CPU lacks: `scripts/isa_emulate.py` loads
//! this library, builds each case natively, runs it natively with AVX2, and
//! runs it again in an x86 emulator with each instruction set, comparing
//! the bits.
//!
//!     cargo build -p lw-model --example isa_probe
//!     python scripts/isa_emulate.py target/debug/examples/libisa_probe.so
//!
//! `lw_probe_run` is the only function the emulator runs: it reads the
//! case's buffers and writes the results, with no allocation, system call
//! or thread-local state, so it needs nothing but the memory it is given.

#[cfg(target_arch = "x86_64")]
mod probe {
    use lw_model::kernels::{
        q4k8_tile, q4k_gemm, q5k8_tile, q6k8_tile, q6k_gemm, q8_0_gemm, q8_0x8_tile, quantize_row,
        small8_tile, ActTile, Isa, Q4kRow, Q6kRow, QuantRow, WideRows, WideTile,
    };
    use lw_model::quant::QMatrix;
    use lw_model::repack::small;
    use lw_model::QType;

    /// The cases, by number: (name, NUL-terminated for C; weight type;
    /// number of results).
    const CASES: [(&str, QType, usize); 14] = [
        ("q8_0 group x 4 rows\0", QType::Q8_0, 4 * 8),
        ("q8_0 group x 1 row\0", QType::Q8_0, 8),
        ("q4_k group x 4 rows\0", QType::Q4K, 4 * 8),
        ("q4_k group x 1 row\0", QType::Q4K, 8),
        ("q6_k group x 4 rows\0", QType::Q6K, 4 * 8),
        ("q6_k group x 1 row\0", QType::Q6K, 8),
        ("q8_0 gemm 4 rows x 1 tile, twice\0", QType::Q8_0, 2 * 4 * 8),
        ("q4_k gemm 2 rows x 2 tiles\0", QType::Q4K, 2 * 2 * 8),
        ("q6_k gemm 2 rows x 2 tiles\0", QType::Q6K, 2 * 2 * 8),
        ("q5_1 group x 4 rows\0", QType::Q5_1, 4 * 8),
        ("q4_0 group x 1 row\0", QType::Q4_0, 8),
        ("q5_0 group x 4 rows\0", QType::Q5_0, 4 * 8),
        ("q5_k group x 4 rows\0", QType::Q5K, 4 * 8),
        ("q5_k group x 1 row\0", QType::Q5K, 8),
    ];

    /// Values of every case: `k` per row, two blocks of 256 (sixteen of 32).
    const K: usize = 512;

    /// One case's inputs, built natively.
    pub struct Probe {
        case: usize,
        /// Eight weight rows, held as one group.
        weights: QMatrix,
        /// Sixteen activation rows (two tiles' worth).
        xs: Vec<QuantRow>,
        wide: WideRows,
        wide_tiles: Vec<WideTile>,
        act_tiles: Vec<ActTile>,
        q4k: Box<[Q4kRow; 8]>,
        q6k: Box<[Q6kRow; 8]>,
    }

    /// Deterministic values in [-1, 1) with a few of the extremes a row can
    /// hold: a spike (so the rest quantize small) and a run at full scale.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect();
        let at = (seed as usize * 37) % n;
        v[at] = if seed.is_multiple_of(2) { 9.0 } else { -9.0 };
        for x in v.iter_mut().take(64) {
            *x = x.signum();
        }
        v
    }

    impl Probe {
        fn new(case: usize, seed: u64) -> Option<Probe> {
            let (_, qtype, _) = *CASES.get(case)?;
            let weights = QMatrix::quantize(qtype, &values(8 * K, seed), 8, K).ok()?;
            let group = if qtype.block_elems() == 32 { 32 } else { 256 };
            let xs: Vec<QuantRow> = (0..16)
                .map(|i| quantize_row(&values(K, seed * 100 + i), group))
                .collect();
            let mut probe = Probe {
                case,
                weights,
                xs,
                wide: WideRows::default(),
                wide_tiles: Vec::new(),
                act_tiles: Vec::new(),
                q4k: Default::default(),
                q6k: Default::default(),
            };
            let at = probe.weights.bytes().as_ptr();
            // SAFETY: the matrix is one group of eight rows of K values, and
            // AVX2 runs here (the harness checks it before loading cases).
            unsafe {
                match case {
                    6 => {
                        probe.wide.fill_groups(K, std::iter::once(at));
                        probe.wide_tiles = probe.xs.chunks(8).map(WideTile::new).collect();
                    }
                    7 => Q4kRow::unpack_group(&mut probe.q4k, at, K / 256),
                    8 => Q6kRow::unpack_group(&mut probe.q6k, at, K / 256),
                    _ => {}
                }
            }
            if case == 7 || case == 8 {
                probe.act_tiles = probe.xs.chunks(8).map(ActTile::new).collect();
            }
            Some(probe)
        }

        /// Results of the case.
        fn len(&self) -> usize {
            CASES[self.case].2
        }

        /// Runs the case with `isa`, writing `len()` results to `out`.
        ///
        /// # Safety
        /// The CPU (or emulator) runs `isa`; `out` holds `len()` values.
        unsafe fn run(&self, isa: Isa, out: *mut f32) {
            let at = self.weights.bytes().as_ptr();
            let x4: [&QuantRow; 4] = std::array::from_fn(|i| &self.xs[i]);
            let x1 = [&self.xs[0]];
            let put_rows = |rows: &[[f32; 8]]| put_rows_at(out, rows);
            match self.case {
                0 => put_rows(&q8_0x8_tile::<4>(isa, at, x4)),
                1 => put_rows(&q8_0x8_tile::<1>(isa, at, x1)),
                2 => put_rows(&q4k8_tile::<4>(isa, at, x4)),
                3 => put_rows(&q4k8_tile::<1>(isa, at, x1)),
                4 => put_rows(&q6k8_tile::<4>(isa, at, x4)),
                5 => put_rows(&q6k8_tile::<1>(isa, at, x1)),
                6 => {
                    // Four weight rows against one tile: the shape the
                    // product uses.
                    for (t, tile) in self.wide_tiles.iter().enumerate() {
                        let v = q8_0_gemm::<4, 1>(isa, &self.wide, 2, [tile]);
                        put_rows_at(out.add(t * 32), v.as_flattened());
                    }
                }
                7 => {
                    let t = [&self.act_tiles[0], &self.act_tiles[1]];
                    let v = q4k_gemm::<2>(isa, [&self.q4k[3], &self.q4k[4]], t);
                    put_rows(v.as_flattened());
                }
                8 => {
                    let t = [&self.act_tiles[0], &self.act_tiles[1]];
                    let v = q6k_gemm::<2>(isa, [&self.q6k[6], &self.q6k[7]], t);
                    put_rows(v.as_flattened());
                }
                9 => put_rows(&small8_tile::<{ small::Q5_1 }, 4>(isa, at, x4)),
                10 => put_rows(&small8_tile::<{ small::Q4_0 }, 1>(isa, at, x1)),
                11 => put_rows(&small8_tile::<{ small::Q5_0 }, 4>(isa, at, x4)),
                12 => put_rows(&q5k8_tile::<4>(isa, at, x4)),
                _ => put_rows(&q5k8_tile::<1>(isa, at, x1)),
            }
        }
    }

    /// Writes rows of eight from `out` on.
    ///
    /// # Safety
    /// `out` holds `8 · rows.len()` values.
    unsafe fn put_rows_at(out: *mut f32, rows: &[[f32; 8]]) {
        for (r, row) in rows.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                *out.add(r * 8 + j) = v;
            }
        }
    }

    /// The number of cases.
    #[no_mangle]
    pub extern "C" fn lw_probe_cases() -> usize {
        CASES.len()
    }

    /// Case `case`'s name (NUL-terminated, static), or null.
    #[no_mangle]
    pub extern "C" fn lw_probe_name(case: usize) -> *const u8 {
        CASES.get(case).map_or(std::ptr::null(), |c| c.0.as_ptr())
    }

    /// Whether this CPU runs AVX2 (the cases are built with it).
    #[no_mangle]
    pub extern "C" fn lw_probe_native() -> bool {
        lw_model::kernels::available()
    }

    /// Builds case `case` from `seed` (null for an unknown case).
    #[no_mangle]
    pub extern "C" fn lw_probe_new(case: usize, seed: u64) -> *mut Probe {
        Probe::new(case, seed).map_or(std::ptr::null_mut(), |p| Box::into_raw(Box::new(p)))
    }

    /// The number of results of a case.
    ///
    /// # Safety
    /// `p` came from [`lw_probe_new`] and was not freed.
    #[no_mangle]
    pub unsafe extern "C" fn lw_probe_len(p: *const Probe) -> usize {
        (*p).len()
    }

    /// The number of instruction sets.
    #[no_mangle]
    pub extern "C" fn lw_probe_isas() -> usize {
        Isa::ALL.len()
    }

    /// Writes instruction set `isa`'s name ([`Isa::name`]) to `out` (room
    /// for `cap` bytes); returns its length, or 0 for an unknown set or too
    /// little room.
    ///
    /// # Safety
    /// `out` holds `cap` bytes.
    #[no_mangle]
    pub unsafe extern "C" fn lw_probe_isa_name(isa: usize, out: *mut u8, cap: usize) -> usize {
        match Isa::ALL.get(isa).map(|i| i.name().as_bytes()) {
            Some(name) if name.len() <= cap => {
                std::ptr::copy_nonoverlapping(name.as_ptr(), out, name.len());
                name.len()
            }
            _ => 0,
        }
    }

    /// Runs a case with instruction set `isa` (its place in [`Isa::ALL`];
    /// out of range: nothing), writing its results to `out`.
    ///
    /// # Safety
    /// `p` came from [`lw_probe_new`]; `out` holds `lw_probe_len(p)`
    /// values; the CPU (or emulator) runs `isa`.
    #[no_mangle]
    pub unsafe extern "C" fn lw_probe_run(p: *const Probe, isa: usize, out: *mut f32) {
        if let Some(&isa) = Isa::ALL.get(isa) {
            (*p).run(isa, out)
        }
    }

    /// Frees a case.
    ///
    /// # Safety
    /// `p` came from [`lw_probe_new`] and is not used again.
    #[no_mangle]
    pub unsafe extern "C" fn lw_probe_free(p: *mut Probe) {
        if !p.is_null() {
            drop(Box::from_raw(p));
        }
    }
}
