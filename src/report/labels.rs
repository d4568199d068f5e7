//! Placing point labels in a scatter plot so that they overlap neither each
//! other nor the points: each label tries positions around its point, nearest
//! first, and takes the one with the least overlap.

/// A pixel rectangle; `x1` and `y1` are exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x0: i32,
    pub y0: i32,
    pub x1: i32,
    pub y1: i32,
}

impl Rect {
    /// The rectangle of size `w`×`h` with top-left corner `(x, y)`.
    pub fn at(x: i32, y: i32, w: i32, h: i32) -> Rect {
        Rect {
            x0: x,
            y0: y,
            x1: x + w,
            y1: y + h,
        }
    }

    /// The square of half-width `r` around `(x, y)`.
    pub fn around(x: i32, y: i32, r: i32) -> Rect {
        Rect {
            x0: x - r,
            y0: y - r,
            x1: x + r + 1,
            y1: y + r + 1,
        }
    }

    /// Area of the intersection with `other`.
    pub fn overlap(&self, other: &Rect) -> i64 {
        let w = (self.x1.min(other.x1) - self.x0.max(other.x0)).max(0) as i64;
        let h = (self.y1.min(other.y1) - self.y0.max(other.y0)).max(0) as i64;
        w * h
    }

    /// The point of the rectangle nearest to `p` (for leader lines).
    pub fn nearest(&self, p: (i32, i32)) -> (i32, i32) {
        (
            p.0.clamp(self.x0, self.x1 - 1),
            p.1.clamp(self.y0, self.y1 - 1),
        )
    }

    /// Area of the rectangle.
    pub fn area(&self) -> i64 {
        (self.x1 - self.x0).max(0) as i64 * (self.y1 - self.y0).max(0) as i64
    }
}

/// Where one label went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The label's box.
    pub rect: Rect,
    /// Whether the label sits away from its point and needs a leader line.
    pub leader: bool,
}

/// Candidate top-left corners for a `w`×`h` label around `(ax, ay)`, nearest
/// first: right, left, above, below, the four diagonals, then the same
/// further out (`ring` 1).
fn candidates(ax: i32, ay: i32, w: i32, h: i32, gap: i32, ring: i32) -> [(i32, i32); 8] {
    let g = gap + ring * (h + gap);
    [
        (ax + g, ay - h / 2),
        (ax - g - w, ay - h / 2),
        (ax - w / 2, ay - g - h),
        (ax - w / 2, ay + g),
        (ax + g, ay - g - h),
        (ax + g, ay + g),
        (ax - g - w, ay - g - h),
        (ax - g - w, ay + g),
    ]
}

/// Places one label per anchor, in the given order. `sizes` are the labels'
/// pixel sizes, `obstacles` other things to keep clear of, `marker` the
/// half-width of the square kept free around every anchor, `gap` the distance
/// between a point and its label, and `bounds` the area labels should stay
/// inside (leaving it costs four times the overlap).
pub fn place(
    anchors: &[(i32, i32)],
    sizes: &[(i32, i32)],
    obstacles: &[Rect],
    marker: i32,
    gap: i32,
    bounds: Rect,
) -> Vec<Placement> {
    assert_eq!(anchors.len(), sizes.len(), "one size per label");
    let mut markers: Vec<Rect> = anchors
        .iter()
        .map(|&(x, y)| Rect::around(x, y, marker))
        .collect();
    markers.extend_from_slice(obstacles);
    let mut placed: Vec<Rect> = vec![];
    let mut out = vec![];
    for (&(ax, ay), &(w, h)) in anchors.iter().zip(sizes) {
        let mut best: Option<(i64, Placement)> = None;
        for ring in 0..3 {
            for (x, y) in candidates(ax, ay, w, h, gap, ring) {
                let rect = Rect::at(x, y, w, h);
                let outside = rect.area() - rect.overlap(&bounds);
                let cost = placed
                    .iter()
                    .chain(&markers)
                    .map(|r| rect.overlap(r))
                    .sum::<i64>()
                    + 4 * outside;
                if best.as_ref().is_none_or(|(c, _)| cost < *c) {
                    best = Some((
                        cost,
                        Placement {
                            rect,
                            leader: ring > 0,
                        },
                    ));
                }
                if cost == 0 {
                    break;
                }
            }
            if best.as_ref().is_some_and(|(c, _)| *c == 0) {
                break;
            }
        }
        let (_, p) = best.expect("at least one candidate");
        placed.push(p.rect);
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Rect = Rect {
        x0: 0,
        y0: 0,
        x1: 1000,
        y1: 1000,
    };

    #[test]
    fn rect_overlap_by_hand() {
        let a = Rect::at(0, 0, 10, 10);
        assert_eq!(a.overlap(&Rect::at(5, 5, 10, 10)), 25);
        assert_eq!(a.overlap(&Rect::at(10, 0, 5, 5)), 0);
        assert_eq!(
            Rect::around(5, 5, 2),
            Rect {
                x0: 3,
                y0: 3,
                x1: 8,
                y1: 8
            }
        );
    }

    #[test]
    fn a_lone_label_goes_right_of_its_point() {
        let p = place(&[(100, 100)], &[(40, 10)], &[], 4, 6, BOUNDS);
        assert_eq!(
            p[0],
            Placement {
                rect: Rect::at(106, 95, 40, 10),
                leader: false
            }
        );
    }

    #[test]
    fn labels_near_the_right_edge_go_left() {
        let p = place(&[(990, 100)], &[(40, 10)], &[], 4, 6, BOUNDS);
        assert_eq!(p[0].rect, Rect::at(944, 95, 40, 10));
    }

    #[test]
    fn obstacles_are_avoided() {
        // The right-hand spot is taken, so the label goes left.
        let p = place(
            &[(100, 100)],
            &[(40, 10)],
            &[Rect::at(104, 90, 50, 20)],
            4,
            6,
            BOUNDS,
        );
        assert_eq!(p[0].rect, Rect::at(54, 95, 40, 10));
    }

    #[test]
    fn nearest_points() {
        let r = Rect::at(10, 10, 20, 10);
        assert_eq!(r.nearest((0, 15)), (10, 15));
        assert_eq!(r.nearest((40, 0)), (29, 10));
        assert_eq!(r.nearest((15, 12)), (15, 12));
    }

    #[test]
    fn close_points_get_disjoint_labels() {
        let anchors = [(100, 100), (104, 102), (98, 96), (110, 100)];
        let sizes = [(60, 12); 4];
        let p = place(&anchors, &sizes, &[], 4, 6, BOUNDS);
        for i in 0..p.len() {
            for j in 0..i {
                assert_eq!(p[i].rect.overlap(&p[j].rect), 0, "{i} and {j}: {p:?}");
            }
            for (k, &(x, y)) in anchors.iter().enumerate() {
                assert_eq!(
                    p[i].rect.overlap(&Rect::around(x, y, 4)),
                    0,
                    "label {i} over point {k}"
                );
            }
        }
    }
}
