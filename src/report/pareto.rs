//! The Pareto frontier of (bits per parameter, accuracy) points: the choices
//! no other choice beats on both storage and accuracy.

/// Whether `a` dominates `b`: `a` needs no more bits, is at least as accurate,
/// and is strictly better in at least one of the two.
pub fn dominates(a: (f64, f64), b: (f64, f64)) -> bool {
    a.0 <= b.0 && a.1 >= b.1 && (a.0 < b.0 || a.1 > b.1)
}

/// Indices of the points on the Pareto frontier (fewest bits, highest
/// score), ordered by increasing bits, then decreasing score, then index.
///
/// Points are `(bits, score)` with higher scores better. A point is on the
/// frontier when no other point dominates it (see [`dominates`]), so exact
/// duplicates of a frontier point are all on it. Points with a non-finite
/// coordinate are never on the frontier and never dominate another.
pub fn frontier(points: &[(f64, f64)]) -> Vec<usize> {
    let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let mut on: Vec<usize> = (0..points.len())
        .filter(|&i| finite(&points[i]))
        .filter(|&i| {
            !points
                .iter()
                .enumerate()
                .any(|(j, q)| j != i && finite(q) && dominates(*q, points[i]))
        })
        .collect();
    on.sort_by(|&a, &b| {
        let (pa, pb) = (points[a], points[b]);
        pa.0.total_cmp(&pb.0)
            .then(pb.1.total_cmp(&pa.1))
            .then(a.cmp(&b))
    });
    on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_point_is_the_frontier() {
        assert_eq!(frontier(&[(4.5, 0.6)]), vec![0]);
        assert!(frontier(&[]).is_empty());
    }

    #[test]
    fn dominated_points_are_dropped() {
        // 16 bits / 0.70 is beaten by nothing (most accurate); 4.5 / 0.65 is the
        // cheapest; 8 / 0.64 is beaten by 4.5 / 0.65; 5 / 0.66 is a trade-off.
        let pts = [(16.0, 0.70), (8.0, 0.64), (4.5, 0.65), (5.0, 0.66)];
        assert_eq!(frontier(&pts), vec![2, 3, 0]);
    }

    #[test]
    fn ties_need_one_strict_improvement() {
        // Same bits: only the more accurate survives.
        assert_eq!(frontier(&[(4.0, 0.5), (4.0, 0.6)]), vec![1]);
        // Same accuracy: only the smaller survives.
        assert_eq!(frontier(&[(8.0, 0.6), (4.0, 0.6)]), vec![1]);
    }

    #[test]
    fn exact_duplicates_are_both_kept() {
        let pts = [(4.0, 0.6), (16.0, 0.7), (4.0, 0.6), (8.0, 0.55)];
        assert_eq!(frontier(&pts), vec![0, 2, 1]);
    }

    #[test]
    fn non_finite_points_are_ignored() {
        let pts = [(f64::NAN, 1.0), (4.0, 0.5), (2.0, f64::INFINITY)];
        assert_eq!(frontier(&pts), vec![1]);
    }
}
