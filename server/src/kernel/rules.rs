//! Integer rules declared by kernels (`// quasar:` directives), evaluated per
//! call over the call's buffer lengths and scalar arguments.
//!
//! Expressions are parsed once at load time with `evalexpr` and evaluated
//! with checked integer arithmetic, so an overflow is an error rather than a
//! wrong dispatch. Besides evalexpr's built-ins (`min`, `max`, comparisons,
//! `&&`, tuples), rules may call `ceil_div(a, b)`.

use evalexpr::error::EvalexprResultValue;
use evalexpr::{Context, DefaultNumericTypes, EvalexprError, EvalexprResult, Node, Value};

/// A parsed rule and its source text.
#[derive(Debug, Clone)]
pub struct Rule {
    source: String,
    node: Node<DefaultNumericTypes>,
}

/// Why a rule could not be parsed or evaluated; the message names the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule `{source_text}`: {detail}")]
pub struct RuleError {
    /// The rule's source.
    pub source_text: String,
    /// What went wrong.
    pub detail: String,
}

impl Rule {
    /// Parses a rule.
    ///
    /// # Errors
    /// [`RuleError`] if the text is not a valid expression.
    pub fn parse(source: &str) -> Result<Self, RuleError> {
        let node = evalexpr::build_operator_tree::<DefaultNumericTypes>(source).map_err(|e| {
            RuleError {
                source_text: source.to_owned(),
                detail: e.to_string(),
            }
        })?;
        Ok(Self {
            source: source.trim().to_owned(),
            node,
        })
    }

    /// The rule's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Identifiers the rule reads.
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        self.node.iter_variable_identifiers()
    }

    fn eval(&self, vars: &Vars) -> Result<Value, RuleError> {
        self.node
            .eval_with_context(vars)
            .map_err(|e| self.error(e.to_string()))
    }

    fn error(&self, detail: String) -> RuleError {
        RuleError {
            source_text: self.source.clone(),
            detail,
        }
    }

    /// Evaluates to a non-negative integer.
    ///
    /// # Errors
    /// [`RuleError`] on overflow, a missing variable, or a non-integer result.
    pub fn eval_count(&self, vars: &Vars) -> Result<u64, RuleError> {
        let v = self.eval(vars)?;
        let i = v
            .as_int()
            .map_err(|_| self.error(format!("expected an integer, got {v}")))?;
        u64::try_from(i).map_err(|_| self.error(format!("evaluated to {i}, which is negative")))
    }

    /// Evaluates to a boolean.
    ///
    /// # Errors
    /// As [`Rule::eval_count`].
    pub fn eval_bool(&self, vars: &Vars) -> Result<bool, RuleError> {
        let v = self.eval(vars)?;
        v.as_boolean()
            .map_err(|_| self.error(format!("expected true or false, got {v}")))
    }

    /// Evaluates to one to three non-negative integers (a workgroup count);
    /// missing dimensions are 1.
    ///
    /// # Errors
    /// As [`Rule::eval_count`], or a tuple of the wrong length.
    pub fn eval_dims(&self, vars: &Vars) -> Result<[u64; 3], RuleError> {
        let v = self.eval(vars)?;
        let items = match &v {
            Value::Tuple(t) => t.clone(),
            other => vec![other.clone()],
        };
        if items.is_empty() || items.len() > 3 {
            return Err(self.error(format!("expected 1 to 3 dimensions, got {v}")));
        }
        let mut dims = [1u64; 3];
        for (d, item) in dims.iter_mut().zip(&items) {
            let i = item
                .as_int()
                .map_err(|_| self.error(format!("expected integers, got {v}")))?;
            *d = u64::try_from(i).map_err(|_| self.error(format!("dimension {i} is negative")))?;
        }
        Ok(dims)
    }
}

/// The variables a rule sees: a small list, cheaper than a map for the dozen
/// names a kernel has.
#[derive(Debug, Default, Clone)]
pub struct Vars {
    values: Vec<(String, Value)>,
}

impl Vars {
    /// Sets an integer variable (replacing any earlier value).
    pub fn set_int(&mut self, name: impl Into<String>, value: i64) {
        self.set(name.into(), Value::Int(value));
    }

    /// Sets a float variable.
    pub fn set_float(&mut self, name: impl Into<String>, value: f64) {
        self.set(name.into(), Value::Float(value));
    }

    fn set(&mut self, name: String, value: Value) {
        if let Some(slot) = self.values.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = value;
        } else {
            self.values.push((name, value));
        }
    }
}

impl Context for Vars {
    type NumericTypes = DefaultNumericTypes;

    fn get_value(&self, identifier: &str) -> Option<&Value> {
        self.values
            .iter()
            .find(|(n, _)| n == identifier)
            .map(|(_, v)| v)
    }

    fn call_function(&self, identifier: &str, argument: &Value) -> EvalexprResultValue {
        match identifier {
            "ceil_div" => {
                let args = argument.as_fixed_len_tuple(2)?;
                let a = args[0].as_int()?;
                let b = args[1].as_int()?;
                if b <= 0 || a < 0 {
                    return Err(EvalexprError::CustomMessage(format!(
                        "ceil_div({a}, {b}) needs a >= 0 and b > 0"
                    )));
                }
                Ok(Value::Int(a / b + i64::from(a % b != 0)))
            }
            _ => Err(EvalexprError::FunctionIdentifierNotFound(
                identifier.to_owned(),
            )),
        }
    }

    fn are_builtin_functions_disabled(&self) -> bool {
        false
    }

    fn set_builtin_functions_disabled(&mut self, _disabled: bool) -> EvalexprResult<()> {
        Err(EvalexprError::CustomMessage(
            "built-in functions cannot be disabled here".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::default();
        v.set_int("len_x", 1000);
        v.set_int("wg_x", 256);
        v.set_int("max_wg", 65535);
        v
    }

    #[test]
    fn counts_dims_and_bools() {
        let v = vars();
        let r = Rule::parse("min(ceil_div(len_x, wg_x), max_wg)").expect("parse");
        assert_eq!(r.eval_count(&v), Ok(4));
        let r = Rule::parse("(ceil_div(len_x, 16), 7)").expect("parse");
        assert_eq!(r.eval_dims(&v), Ok([63, 7, 1]));
        let r = Rule::parse("len_x == 1000 && wg_x >= 1").expect("parse");
        assert_eq!(r.eval_bool(&v), Ok(true));
    }

    #[test]
    fn errors_are_reported_not_panicked() {
        let v = vars();
        for bad in [
            "len_y",
            "ceil_div(len_x, 0)",
            "9223372036854775807 * len_x",
            "0 - len_x",
            "(1, 2, 3, 4)",
        ] {
            let r = Rule::parse(bad).expect("parse");
            assert!(r.eval_dims(&v).is_err(), "{bad}");
        }
        assert!(Rule::parse("(((").is_err());
    }
}
