//! A Karel-like domain for the probing study: grid worlds with walls and
//! markers, a robot with a position and a facing, programs over `move`,
//! `turnLeft`, `turnRight`, `putMarker`, `pickMarker` (with `repeat N { … }`
//! as an option), an interpreter that records the robot's state after each
//! primitive, and a generator of (specification, program) examples: a
//! specification is input/output world pairs the program maps one to the
//! other.
//!
//! Text forms (what a model reads and writes):
//! - a world: `W H` on the first line, then `H` rows of `W` cells (`.`
//!   empty, `#` wall, `1`–`9` markers), then `robot X Y D` (D one of `N E S
//!   W`; y grows downwards);
//! - a program: tokens separated by spaces, `repeat N { … }` nesting.

use std::fmt::Write as _;

use lw_core::rng::Rng;

/// Markers a cell holds at most.
pub const MAX_MARKERS: u8 = 9;

/// Where the robot faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Facing {
    North,
    East,
    South,
    West,
}

impl Facing {
    pub const ALL: [Facing; 4] = [Facing::North, Facing::East, Facing::South, Facing::West];

    pub fn index(self) -> usize {
        self as usize
    }

    fn left(self) -> Facing {
        Facing::ALL[(self.index() + 3) % 4]
    }

    fn right(self) -> Facing {
        Facing::ALL[(self.index() + 1) % 4]
    }

    fn step(self) -> (i32, i32) {
        match self {
            Facing::North => (0, -1),
            Facing::East => (1, 0),
            Facing::South => (0, 1),
            Facing::West => (-1, 0),
        }
    }

    fn letter(self) -> char {
        ['N', 'E', 'S', 'W'][self.index()]
    }

    fn from_letter(c: &str) -> Option<Facing> {
        Some(match c {
            "N" => Facing::North,
            "E" => Facing::East,
            "S" => Facing::South,
            "W" => Facing::West,
            _ => return None,
        })
    }
}

/// The robot's position and facing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Robot {
    pub x: usize,
    pub y: usize,
    pub facing: Facing,
}

/// A grid world.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct World {
    pub width: usize,
    pub height: usize,
    /// Row-major: walls.
    pub walls: Vec<bool>,
    /// Row-major: markers per cell.
    pub markers: Vec<u8>,
    pub robot: Robot,
}

/// A primitive action, or a loop of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    Move,
    TurnLeft,
    TurnRight,
    PutMarker,
    PickMarker,
    Repeat(u32, Vec<Stmt>),
}

/// What stops a program.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KarelError {
    #[error("the robot ran into a wall or the edge at ({x}, {y})")]
    Crash { x: usize, y: usize },
    #[error("no marker to pick at ({x}, {y})")]
    NothingToPick { x: usize, y: usize },
    #[error("the cell at ({x}, {y}) holds {MAX_MARKERS} markers already")]
    CellFull { x: usize, y: usize },
    #[error("program text: {0}")]
    Parse(String),
    #[error("world text: {0}")]
    WorldText(String),
}

impl World {
    fn at(&self, x: usize, y: usize) -> usize {
        y * self.width + x
    }

    /// The cell in front of the robot, where it can be entered.
    fn front(&self) -> Option<(usize, usize)> {
        let (dx, dy) = self.robot.facing.step();
        let x = self.robot.x as i32 + dx;
        let y = self.robot.y as i32 + dy;
        if x < 0 || y < 0 || x >= self.width as i32 || y >= self.height as i32 {
            return None;
        }
        let (x, y) = (x as usize, y as usize);
        (!self.walls[self.at(x, y)]).then_some((x, y))
    }

    /// Runs one primitive.
    fn act(&mut self, s: &Stmt) -> Result<(), KarelError> {
        let Robot { x, y, facing } = self.robot;
        match s {
            Stmt::Move => match self.front() {
                Some((nx, ny)) => {
                    self.robot.x = nx;
                    self.robot.y = ny;
                }
                None => return Err(KarelError::Crash { x, y }),
            },
            Stmt::TurnLeft => self.robot.facing = facing.left(),
            Stmt::TurnRight => self.robot.facing = facing.right(),
            Stmt::PutMarker => {
                let i = self.at(x, y);
                if self.markers[i] >= MAX_MARKERS {
                    return Err(KarelError::CellFull { x, y });
                }
                self.markers[i] += 1;
            }
            Stmt::PickMarker => {
                let i = self.at(x, y);
                if self.markers[i] == 0 {
                    return Err(KarelError::NothingToPick { x, y });
                }
                self.markers[i] -= 1;
            }
            Stmt::Repeat(..) => unreachable!("loops are unrolled by run"),
        }
        Ok(())
    }

    /// The world as text (see the module comment).
    pub fn to_text(&self) -> String {
        let mut s = format!("{} {}\n", self.width, self.height);
        for y in 0..self.height {
            for x in 0..self.width {
                let i = self.at(x, y);
                s.push(if self.walls[i] {
                    '#'
                } else if self.markers[i] > 0 {
                    (b'0' + self.markers[i]) as char
                } else {
                    '.'
                });
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "robot {} {} {}",
            self.robot.x,
            self.robot.y,
            self.robot.facing.letter()
        );
        s
    }

    /// Reads [`World::to_text`]'s form back.
    pub fn parse(text: &str) -> Result<World, KarelError> {
        let bad = |m: &str| KarelError::WorldText(m.to_string());
        let mut lines = text.lines();
        let size: Vec<usize> = lines
            .next()
            .ok_or_else(|| bad("empty"))?
            .split_whitespace()
            .map(|n| n.parse().map_err(|_| bad("size is not two numbers")))
            .collect::<Result<_, _>>()?;
        let [width, height] = size[..] else {
            return Err(bad("size is not two numbers"));
        };
        let (mut walls, mut markers) = (Vec::new(), Vec::new());
        for _ in 0..height {
            let row = lines
                .next()
                .ok_or_else(|| bad("fewer rows than its height"))?;
            if row.chars().count() != width {
                return Err(bad("a row of another width"));
            }
            for c in row.chars() {
                walls.push(c == '#');
                markers.push(match c {
                    '.' | '#' => 0,
                    '1'..='9' => c as u8 - b'0',
                    _ => return Err(bad("a cell that is not . # or 1-9")),
                });
            }
        }
        let robot: Vec<&str> = lines
            .next()
            .ok_or_else(|| bad("no robot line"))?
            .split_whitespace()
            .collect();
        let ["robot", x, y, d] = robot[..] else {
            return Err(bad("the robot line is not `robot X Y D`"));
        };
        let pos = |v: &str| v.parse::<usize>().map_err(|_| bad("robot position"));
        let robot = Robot {
            x: pos(x)?,
            y: pos(y)?,
            facing: Facing::from_letter(d).ok_or_else(|| bad("robot facing"))?,
        };
        if robot.x >= width || robot.y >= height || walls[robot.y * width + robot.x] {
            return Err(bad("the robot stands outside the grid or in a wall"));
        }
        Ok(World {
            width,
            height,
            walls,
            markers,
            robot,
        })
    }
}

/// A program's text (see the module comment).
pub fn program_text(prog: &[Stmt]) -> String {
    let mut out = Vec::new();
    fn push(out: &mut Vec<String>, prog: &[Stmt]) {
        for s in prog {
            match s {
                Stmt::Move => out.push("move".into()),
                Stmt::TurnLeft => out.push("turnLeft".into()),
                Stmt::TurnRight => out.push("turnRight".into()),
                Stmt::PutMarker => out.push("putMarker".into()),
                Stmt::PickMarker => out.push("pickMarker".into()),
                Stmt::Repeat(n, body) => {
                    out.push("repeat".into());
                    out.push(n.to_string());
                    out.push("{".into());
                    push(out, body);
                    out.push("}".into());
                }
            }
        }
    }
    push(&mut out, prog);
    out.join(" ")
}

/// Reads [`program_text`]'s form back.
pub fn parse_program(text: &str) -> Result<Vec<Stmt>, KarelError> {
    fn block<'a>(
        tokens: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
        nested: bool,
    ) -> Result<Vec<Stmt>, KarelError> {
        let mut out = Vec::new();
        loop {
            let Some(t) = tokens.next() else {
                return if nested {
                    Err(KarelError::Parse("`{` without `}`".into()))
                } else {
                    Ok(out)
                };
            };
            out.push(match t {
                "move" => Stmt::Move,
                "turnLeft" => Stmt::TurnLeft,
                "turnRight" => Stmt::TurnRight,
                "putMarker" => Stmt::PutMarker,
                "pickMarker" => Stmt::PickMarker,
                "repeat" => {
                    let n: u32 = tokens
                        .next()
                        .and_then(|n| n.parse().ok())
                        .filter(|&n| n > 0)
                        .ok_or_else(|| KarelError::Parse("`repeat` without a count".into()))?;
                    if tokens.next() != Some("{") {
                        return Err(KarelError::Parse("`repeat N` without `{`".into()));
                    }
                    Stmt::Repeat(n, block(tokens, true)?)
                }
                "}" if nested => return Ok(out),
                other => return Err(KarelError::Parse(format!("unknown token `{other}`"))),
            });
        }
    }
    block(&mut text.split_whitespace().peekable(), false)
}

/// The program's primitives in the order they run (loops unrolled).
pub fn unrolled(prog: &[Stmt]) -> Vec<Stmt> {
    let mut out = Vec::new();
    for s in prog {
        match s {
            Stmt::Repeat(n, body) => {
                let inner = unrolled(body);
                for _ in 0..*n {
                    out.extend(inner.iter().cloned());
                }
            }
            s => out.push(s.clone()),
        }
    }
    out
}

/// What the primitives mean: as written, or an alternative a probe can be
/// trained against (the interventional baseline: a probe that reads the
/// alternative as well as the real meaning learnt it by itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantics {
    Real,
    /// `turnLeft` turns right and `turnRight` left.
    SwappedTurns,
}

/// Runs `prog` on `world`: the final world and the robot after each
/// primitive, in order.
pub fn run(world: &World, prog: &[Stmt]) -> Result<(World, Vec<Robot>), KarelError> {
    run_as(world, prog, Semantics::Real)
}

/// [`run`] under `semantics`.
pub fn run_as(
    world: &World,
    prog: &[Stmt],
    semantics: Semantics,
) -> Result<(World, Vec<Robot>), KarelError> {
    let mut w = world.clone();
    let mut trace = Vec::new();
    for s in unrolled(prog) {
        let s = match (semantics, s) {
            (Semantics::SwappedTurns, Stmt::TurnLeft) => Stmt::TurnRight,
            (Semantics::SwappedTurns, Stmt::TurnRight) => Stmt::TurnLeft,
            (_, s) => s,
        };
        w.act(&s)?;
        trace.push(w.robot);
    }
    Ok((w, trace))
}

/// One example: worlds the program maps to their outputs, and the program.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub spec: Vec<(World, World)>,
    pub program: Vec<Stmt>,
}

impl Example {
    /// What a model is trained on: the specification, then the program.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for (i, (a, b)) in self.spec.iter().enumerate() {
            let _ = write!(
                s,
                "input {}\n{}output {}\n{}",
                i + 1,
                a.to_text(),
                i + 1,
                b.to_text()
            );
        }
        let _ = write!(s, "program: {}", program_text(&self.program));
        s
    }

    /// Reads [`Example::to_text`]'s form back.
    pub fn parse(text: &str) -> Result<Example, KarelError> {
        let bad = |m: &str| KarelError::WorldText(m.to_string());
        let at = text
            .rfind("program:")
            .ok_or_else(|| bad("no `program:` line"))?;
        let program = parse_program(&text[at + "program:".len()..])?;
        let mut worlds = Vec::new();
        let mut current = String::new();
        for line in text[..at].lines() {
            if line.starts_with("input ") || line.starts_with("output ") {
                if !current.is_empty() {
                    worlds.push(World::parse(&current)?);
                    current.clear();
                }
            } else {
                current.push_str(line);
                current.push('\n');
            }
        }
        if !current.is_empty() {
            worlds.push(World::parse(&current)?);
        }
        if worlds.is_empty() || worlds.len() % 2 != 0 {
            return Err(bad("worlds do not come in input/output pairs"));
        }
        let spec = worlds
            .chunks(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        Ok(Example { spec, program })
    }

    /// The text up to the program, for a model to complete.
    pub fn prompt(&self) -> String {
        let text = self.to_text();
        let end = text.rfind("program:").expect("a program") + "program:".len();
        text[..end].to_string()
    }

    /// Whether `program` maps every input of the specification to its
    /// output.
    pub fn satisfied_by(&self, program: &[Stmt]) -> bool {
        self.spec
            .iter()
            .all(|(a, b)| run(a, program).is_ok_and(|(out, _)| &out == b))
    }
}

/// What the generator makes.
#[derive(Debug, Clone, Copy)]
pub struct GenOptions {
    pub width: usize,
    pub height: usize,
    /// Primitives per program, at least and at most.
    pub min_len: usize,
    pub max_len: usize,
    /// Input/output pairs per specification.
    pub pairs: usize,
    /// Allow `repeat N { … }`.
    pub loops: bool,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            width: 6,
            height: 6,
            min_len: 3,
            max_len: 8,
            pairs: 3,
            loops: false,
        }
    }
}

/// A random world: about one cell in eight a wall, one in six holding
/// markers, the robot on a free cell.
pub fn random_world(rng: &mut Rng, width: usize, height: usize) -> World {
    let cells = width * height;
    let walls: Vec<bool> = (0..cells).map(|_| rng.below(8) == 0).collect();
    let markers: Vec<u8> = (0..cells)
        .map(|i| {
            if !walls[i] && rng.below(6) == 0 {
                1 + rng.below(3) as u8
            } else {
                0
            }
        })
        .collect();
    let free: Vec<usize> = (0..cells).filter(|&i| !walls[i]).collect();
    let at = if free.is_empty() {
        0
    } else {
        free[rng.below(free.len())]
    };
    let mut world = World {
        width,
        height,
        walls,
        markers,
        robot: Robot {
            x: at % width,
            y: at / width,
            facing: Facing::ALL[rng.below(4)],
        },
    };
    world.walls[at] = false;
    world
}

fn random_program(rng: &mut Rng, o: &GenOptions) -> Vec<Stmt> {
    let prims = [
        Stmt::Move,
        Stmt::Move,
        Stmt::TurnLeft,
        Stmt::TurnRight,
        Stmt::PutMarker,
        Stmt::PickMarker,
    ];
    let len = o.min_len + rng.below(o.max_len - o.min_len + 1);
    let mut prog = Vec::new();
    let mut n = 0;
    while n < len {
        if o.loops && len - n >= 4 && rng.below(5) == 0 {
            let times = 2 + rng.below(2) as u32;
            let body_len = 1 + rng.below(((len - n) / times as usize).clamp(1, 3));
            let body: Vec<Stmt> = (0..body_len)
                .map(|_| prims[rng.below(prims.len())].clone())
                .collect();
            n += body_len * times as usize;
            prog.push(Stmt::Repeat(times, body));
        } else {
            prog.push(prims[rng.below(prims.len())].clone());
            n += 1;
        }
    }
    prog
}

/// A random example: a program and `pairs` random inputs it runs on
/// without error, each with its output. `None` when 200 tries found none
/// (a program that crashes everywhere).
pub fn random_example(rng: &mut Rng, o: &GenOptions) -> Option<Example> {
    for _ in 0..200 {
        let program = random_program(rng, o);
        let mut spec = Vec::new();
        for _ in 0..o.pairs * 20 {
            let input = random_world(rng, o.width, o.height);
            if let Ok((output, _)) = run(&input, &program) {
                spec.push((input, output));
                if spec.len() == o.pairs {
                    return Some(Example { spec, program });
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(text: &str) -> World {
        World::parse(text).unwrap()
    }

    #[test]
    fn moves_turns_and_markers_as_written() {
        let w = world("3 2\n.#1\n...\nrobot 0 1 E\n");
        let prog =
            parse_program("move move turnLeft move pickMarker putMarker putMarker turnRight")
                .unwrap();
        let (out, trace) = run(&w, &prog).unwrap();
        assert_eq!(out.to_text(), "3 2\n.#2\n...\nrobot 2 0 E\n");
        let states: Vec<(usize, usize, Facing)> =
            trace.iter().map(|r| (r.x, r.y, r.facing)).collect();
        assert_eq!(
            states,
            [
                (1, 1, Facing::East),
                (2, 1, Facing::East),
                (2, 1, Facing::North),
                (2, 0, Facing::North),
                (2, 0, Facing::North),
                (2, 0, Facing::North),
                (2, 0, Facing::North),
                (2, 0, Facing::East),
            ]
        );
        // The input is untouched.
        assert_eq!(w.markers[2], 1);
    }

    #[test]
    fn crashes_and_empty_cells_stop_a_program() {
        let w = world("2 2\n.#\n..\nrobot 0 0 E\n");
        assert_eq!(
            run(&w, &[Stmt::Move]).unwrap_err(),
            KarelError::Crash { x: 0, y: 0 }
        );
        assert_eq!(
            run(&w, &[Stmt::TurnLeft, Stmt::Move]).unwrap_err(),
            KarelError::Crash { x: 0, y: 0 }
        );
        assert_eq!(
            run(&w, &[Stmt::PickMarker]).unwrap_err(),
            KarelError::NothingToPick { x: 0, y: 0 }
        );
        let full = world("1 1\n9\nrobot 0 0 N\n");
        assert_eq!(
            run(&full, &[Stmt::PutMarker]).unwrap_err(),
            KarelError::CellFull { x: 0, y: 0 }
        );
    }

    #[test]
    fn loops_unroll_and_texts_read_back() {
        let p = parse_program("repeat 2 { move repeat 3 { turnRight } } putMarker").unwrap();
        assert_eq!(
            program_text(&p),
            "repeat 2 { move repeat 3 { turnRight } } putMarker"
        );
        assert_eq!(unrolled(&p).len(), 2 * 4 + 1);
        let w = world("3 3\n...\n...\n...\nrobot 1 2 N\n");
        // Three right turns are a left turn: north, then west.
        let (out, _) = run(&w, &p).unwrap();
        assert_eq!(
            out.robot,
            Robot {
                x: 0,
                y: 1,
                facing: Facing::South
            }
        );
        assert_eq!(out.markers[3], 1);
        for bad in [
            "repeat { move }",
            "repeat 2 move",
            "repeat 2 { move",
            "jump",
            "}",
        ] {
            assert!(parse_program(bad).is_err(), "{bad}");
        }
        for bad in [
            "",
            "2 1\n..\n",
            "1 1\nx\nrobot 0 0 N",
            "1 1\n#\nrobot 0 0 N",
            "1 1\n.\nrobot 0 0 Q",
        ] {
            assert!(World::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_programs_satisfy_their_specifications() {
        let mut rng = Rng::new(7);
        for loops in [false, true] {
            let o = GenOptions {
                loops,
                ..GenOptions::default()
            };
            for _ in 0..200 {
                let e = random_example(&mut rng, &o).expect("an example");
                assert_eq!(e.spec.len(), o.pairs);
                assert!(e.satisfied_by(&e.program));
                let n = unrolled(&e.program).len();
                assert!(n >= o.min_len, "{n}");
                // The texts read back to the same example.
                assert_eq!(parse_program(&program_text(&e.program)).unwrap(), e.program);
                for (a, b) in &e.spec {
                    assert_eq!(&World::parse(&a.to_text()).unwrap(), a);
                    assert_eq!(&World::parse(&b.to_text()).unwrap(), b);
                }
                assert!(e.to_text().starts_with(&e.prompt()));
                assert_eq!(Example::parse(&e.to_text()).unwrap(), e);
            }
        }
        // Swapped turns: left is right.
        let w = random_world(&mut rng, 5, 5);
        let (real, _) = run(&w, &[Stmt::TurnLeft]).unwrap();
        let (alt, _) = run_as(&w, &[Stmt::TurnRight], Semantics::SwappedTurns).unwrap();
        assert_eq!(real, alt);
        // A wrong program fails some specification (most do).
        let e = random_example(&mut rng, &GenOptions::default()).unwrap();
        let mut other = e.program.clone();
        other.push(Stmt::TurnLeft);
        assert!(!e.satisfied_by(&other));
    }
}
