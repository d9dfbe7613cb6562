//! Which update each parameter of a candle model gets, and how a spectral parameter is seen
//! as matrices.

use crate::error::{Error, Result};
use crate::layout::MatrixShape;

/// How a parameter's tensor is read as one or more `(fan_out, fan_in)` matrices for the
/// spectral step (math §5c; §2: the condition is stated per linear map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatrixView {
    /// By rank: `(out, in)` is one matrix (candle's `Linear` layout); `(k, out, in)` is `k`
    /// matrices of `(out, in)` (a stack of experts: each is a linear map of its own);
    /// `(out, in, kh, kw, ...)` is one `(out, in·kh·kw·...)` matrix (a convolution kernel
    /// flattened per output channel, as Muon's reference implementation does). A scalar or a
    /// vector has no matrix view: it is an error naming the parameter.
    Auto,
    /// The whole tensor as one `(n, 1)` matrix, `n` its element count: the paper's treatment
    /// of a bias (an input layer whose input is the constant 1, math §2), which makes the
    /// update's RMS the learning rate.
    Column,
    /// A rank-2 tensor stored `(fan_in, fan_out)`: an embedding table `(vocab, hidden)` is the
    /// input layer of a one-hot input, so `fan_in` is the vocabulary size (the paper's
    /// choice). The power iteration runs on the stored matrix (its spectral norm is its
    /// transpose's); only the target `s` uses the transposed shape.
    Transposed,
}

/// The update a parameter gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// The spectral step (math §3a, §5), on the matrices of the view.
    Spectral(MatrixView),
    /// The AdamW group: candle-nn's `AdamW` rule with the config's own learning rate and
    /// weight decay.
    AdamW,
    /// Not stepped: the parameter keeps its value and needs no gradient.
    Frozen,
}

impl Route {
    /// The name the state file records for this route.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Route::Spectral(MatrixView::Auto) => "spectral",
            Route::Spectral(MatrixView::Column) => "spectral_column",
            Route::Spectral(MatrixView::Transposed) => "spectral_transposed",
            Route::AdamW => "adamw",
            Route::Frozen => "frozen",
        }
    }
}

/// Which parameters a routing rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// The parameter of exactly this name (a `VarMap` key, such as `"lm_head.weight"`).
    Name(String),
    /// Every parameter whose name contains this text.
    NameContains(String),
    /// Every parameter of exactly these dimensions.
    Shape(Vec<usize>),
    /// Every parameter of this rank (number of dimensions).
    Rank(usize),
}

impl Selector {
    fn matches(&self, name: Option<&str>, dims: &[usize]) -> bool {
        match self {
            Selector::Name(wanted) => name == Some(wanted.as_str()),
            Selector::NameContains(part) => name.is_some_and(|name| name.contains(part.as_str())),
            Selector::Shape(shape) => shape.as_slice() == dims,
            Selector::Rank(rank) => *rank == dims.len(),
        }
    }
}

/// The rules that route each parameter; the first rule that matches wins, and a parameter no
/// rule matches gets the default of its routing.
///
/// * [`Routing::muon`] (the [`Default`]): matrices, convolution kernels and stacks of
///   matrices get the spectral step; scalars, vectors (biases, norm gains) and embeddings get
///   AdamW. This is the split Muon's users follow (Jordan et al. 2024; PyTorch's
///   `torch.optim.Muon` documents that it is for 2-D hidden weights only, the rest going to
///   AdamW). Muon's users often send the output head to AdamW too; its shape cannot tell it
///   from a hidden layer, so name it: `.name("lm_head.weight", Route::AdamW)`.
/// * [`Routing::paper`]: everything gets the spectral step, as in Yang, Simon & Bernstein
///   (2023): a vector as an `(n, 1)` matrix ([`MatrixView::Column`]) and an embedding as the
///   input layer with `fan_in` the vocabulary size ([`MatrixView::Transposed`]).
///
/// A parameter is an embedding when a `.`-separated segment of its name contains `embed`, or
/// is `wte` or `wpe` (GPT-2's names); parameters without names (given to
/// [`Optimizer::new`](candle_nn::Optimizer::new) as bare `Var`s) are never embeddings, so
/// build from a `VarMap` to route by name.
///
/// ```
/// use spectral_step::candle::{MatrixView, Route, Routing};
///
/// let routing = Routing::muon().name("lm_head.weight", Route::AdamW);
/// assert_eq!(routing.route_of(Some("lm_head.weight"), &[50257, 768]), Route::AdamW);
/// assert_eq!(routing.route_of(Some("h.0.mlp.c_fc.weight"), &[3072, 768]), Route::Spectral(MatrixView::Auto));
/// assert_eq!(routing.route_of(Some("h.0.ln_1.weight"), &[768]), Route::AdamW);
/// assert_eq!(routing.route_of(Some("wte.weight"), &[50257, 768]), Route::AdamW);
/// assert_eq!(Routing::paper().route_of(Some("wte.weight"), &[50257, 768]), Route::Spectral(MatrixView::Transposed));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routing {
    rules: Vec<(Selector, Route)>,
    vectors: Route,
    embeddings: Route,
}

impl Default for Routing {
    fn default() -> Self {
        Self::muon()
    }
}

impl Routing {
    /// Matrices to the spectral step; vectors and embeddings to AdamW (Muon's split).
    pub fn muon() -> Self {
        Self {
            rules: Vec::new(),
            vectors: Route::AdamW,
            embeddings: Route::AdamW,
        }
    }

    /// Everything to the spectral step, vectors as `(n, 1)` matrices and embeddings as input
    /// layers (the paper's choice).
    pub fn paper() -> Self {
        Self {
            rules: Vec::new(),
            vectors: Route::Spectral(MatrixView::Column),
            embeddings: Route::Spectral(MatrixView::Transposed),
        }
    }

    /// Adds a rule after the existing ones (earlier rules win).
    pub fn rule(mut self, selector: Selector, route: Route) -> Self {
        self.rules.push((selector, route));
        self
    }

    /// Routes the parameter of this exact name.
    pub fn name(self, name: impl Into<String>, route: Route) -> Self {
        self.rule(Selector::Name(name.into()), route)
    }

    /// Routes every parameter whose name contains `part`.
    pub fn name_contains(self, part: impl Into<String>, route: Route) -> Self {
        self.rule(Selector::NameContains(part.into()), route)
    }

    /// Routes every parameter of exactly these dimensions.
    pub fn shape(self, dims: &[usize], route: Route) -> Self {
        self.rule(Selector::Shape(dims.to_vec()), route)
    }

    /// Routes every parameter of this rank.
    pub fn rank(self, rank: usize, route: Route) -> Self {
        self.rule(Selector::Rank(rank), route)
    }

    /// The route of a parameter with this name (if known) and these dimensions.
    pub fn route_of(&self, name: Option<&str>, dims: &[usize]) -> Route {
        if let Some((_, route)) = self
            .rules
            .iter()
            .find(|(selector, _)| selector.matches(name, dims))
        {
            return *route;
        }
        if dims.len() <= 1 {
            self.vectors
        } else if name.is_some_and(is_embedding_name) {
            self.embeddings
        } else {
            Route::Spectral(MatrixView::Auto)
        }
    }
}

fn is_embedding_name(name: &str) -> bool {
    name.split('.')
        .any(|segment| segment.contains("embed") || segment == "wte" || segment == "wpe")
}

/// The matrices a spectral parameter is stepped as: `count` matrices of `stored` shape, laid
/// one after the other in the tensor's row-major storage, and the shape whose target `s` the
/// update takes (`stored`, or its transpose for [`MatrixView::Transposed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    pub stored: MatrixShape,
    pub count: usize,
    pub target: MatrixShape,
}

impl Placement {
    /// The tensor's values (row-major, `count` matrices of `stored`) as one vector per
    /// matrix.
    pub fn matrices<'v>(&self, values: &'v [f32]) -> impl Iterator<Item = Vec<f32>> + 'v {
        values.chunks_exact(self.stored.len()).map(<[f32]>::to_vec)
    }

    /// The matrices of a tensor of dimensions `dims` under `view`; errors, naming the
    /// parameter, when the view does not apply or a dimension is zero.
    pub fn new(name: &str, dims: &[usize], view: MatrixView) -> Result<Self> {
        let unsupported = |problem: String| Error::Parameter {
            name: name.to_owned(),
            problem,
        };
        let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let elements = elements.ok_or_else(|| unsupported("its element count overflows".into()))?;
        if elements == 0 {
            return Err(unsupported(format!(
                "shape {dims:?} has no elements, so it has no spectral norm"
            )));
        }
        let (stored, count, transposed) = match (view, dims) {
            (MatrixView::Column, _) => (MatrixShape::new(elements, 1), 1, false),
            (MatrixView::Transposed, &[rows, cols]) => (MatrixShape::new(rows, cols), 1, true),
            (MatrixView::Transposed, _) => {
                return Err(unsupported(format!(
                    "shape {dims:?}: the transposed view is for rank-2 tensors (an embedding table)"
                )));
            }
            (MatrixView::Auto, &[] | &[_]) => {
                return Err(unsupported(format!(
                    "shape {dims:?} has no matrix view: route it to AdamW, or step it as an \
                     (n, 1) matrix with MatrixView::Column"
                )));
            }
            (MatrixView::Auto, &[fan_out, fan_in]) => (MatrixShape::new(fan_out, fan_in), 1, false),
            (MatrixView::Auto, &[count, fan_out, fan_in]) => {
                (MatrixShape::new(fan_out, fan_in), count, false)
            }
            (MatrixView::Auto, &[fan_out, ..]) => {
                (MatrixShape::new(fan_out, elements / fan_out), 1, false)
            }
        };
        let target = if transposed {
            MatrixShape::new(stored.fan_in, stored.fan_out)
        } else {
            stored
        };
        Ok(Self {
            stored,
            count,
            target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placements_follow_the_documented_views() {
        let place = |dims: &[usize], view| Placement::new("p", dims, view).unwrap();
        let linear = place(&[96, 32], MatrixView::Auto);
        assert_eq!((linear.stored, linear.count), (MatrixShape::new(96, 32), 1));
        let experts = place(&[4, 96, 32], MatrixView::Auto);
        assert_eq!(
            (experts.stored, experts.count),
            (MatrixShape::new(96, 32), 4)
        );
        let conv = place(&[16, 3, 5, 7], MatrixView::Auto);
        assert_eq!((conv.stored, conv.count), (MatrixShape::new(16, 105), 1));
        let bias = place(&[96], MatrixView::Column);
        assert_eq!(bias.stored, MatrixShape::new(96, 1));
        assert_eq!(bias.target, bias.stored);
        let embedding = place(&[65, 128], MatrixView::Transposed);
        assert_eq!(embedding.stored, MatrixShape::new(65, 128));
        assert_eq!(embedding.target, MatrixShape::new(128, 65));
    }

    #[test]
    fn views_that_do_not_apply_name_the_parameter() {
        for (dims, view) in [
            (&[7][..], MatrixView::Auto),
            (&[][..], MatrixView::Auto),
            (&[2, 3, 4][..], MatrixView::Transposed),
            (&[0, 3][..], MatrixView::Auto),
            (&[4, 0, 3][..], MatrixView::Column),
        ] {
            let error = Placement::new("blocks.0.norm", dims, view).unwrap_err();
            assert!(
                matches!(&error, Error::Parameter { name, .. } if name == "blocks.0.norm"),
                "{dims:?} {view:?}: {error}"
            );
        }
    }

    #[test]
    fn first_matching_rule_wins_then_the_defaults() {
        let routing = Routing::muon()
            .name("head.weight", Route::AdamW)
            .name_contains("frozen", Route::Frozen)
            .shape(&[10, 20], Route::Spectral(MatrixView::Column))
            .rank(3, Route::AdamW);
        assert_eq!(
            routing.route_of(Some("head.weight"), &[10, 20]),
            Route::AdamW
        );
        assert_eq!(
            routing.route_of(Some("a.frozen.w"), &[10, 20]),
            Route::Frozen
        );
        assert_eq!(
            routing.route_of(Some("x"), &[10, 20]),
            Route::Spectral(MatrixView::Column)
        );
        assert_eq!(routing.route_of(None, &[2, 10, 20]), Route::AdamW);
        assert_eq!(
            routing.route_of(None, &[20, 10]),
            Route::Spectral(MatrixView::Auto)
        );
        assert_eq!(routing.route_of(None, &[20]), Route::AdamW);
        assert_eq!(
            routing.route_of(Some("model.embed_tokens.weight"), &[9, 4]),
            Route::AdamW
        );
        assert_eq!(routing.route_of(Some("wpe"), &[9, 4]), Route::AdamW);
        // Embeddings are known by name only.
        assert_eq!(
            routing.route_of(None, &[9, 4]),
            Route::Spectral(MatrixView::Auto)
        );
        assert_eq!(
            Routing::paper().route_of(Some("ln.bias"), &[4]),
            Route::Spectral(MatrixView::Column)
        );
    }
}
