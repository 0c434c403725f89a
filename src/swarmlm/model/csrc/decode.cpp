// The one-row decode step of model/fastdecode.py (DecodeStep.run, one row) as one C++ call.
//
// The float parts are the very ATen ops the Python loop calls, in the same order and with the same
// arguments (mm / addmm, mul, roll, addcmul, copy_, scaled_dot_product_attention, add, silu; the
// RMSNorms as the steps torch.rms_norm takes, into kept buffers), so the numbers are bit for bit
// those of the Python step (and of Transformer.run_blocks: the tests check both); only the
// interpreter between them is gone. Quantized Linears call the
// kernels of qgemv.cpp directly (activation quantization inside), as QuantLinear.rows_fn does.
// A Plan is built once per DecodeStep (weights and cache buffers bound as they are then).
#include <torch/extension.h>
#include <pybind11/stl.h>
#include <cmath>

torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor rowsum);
torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor w, torch::Tensor scales, torch::Tensor lows, int64_t group);

namespace {

enum Kind : int64_t { MM = 0, ADDMM = 1, INT8 = 2, INT4 = 3 };

// torch.rms_norm of float32 rows, as the ATen composite computes it on the CPU (pow, mean as sum
// then div_, add_ eps, rsqrt, mul by the row's factor, mul by the weight): the very kernels, into
// buffers kept between calls instead of new tensors (the tests compare it with torch.rms_norm).
struct RmsNorm {
  torch::Tensor sq, factor, out;

  const torch::Tensor& operator()(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
    if (!out.defined() || out.sizes() != x.sizes()) {
      sq = torch::empty_like(x);
      out = torch::empty_like(x);
      factor = torch::empty({x.size(0), 1}, x.options());
    }
    at::pow_out(sq, x, 2);
    at::sum_out(factor, sq, {-1}, true).div_(x.size(-1));
    factor.add_(eps).rsqrt_();
    at::mul_out(out, x, factor);
    return out.mul_(weight);
  }
};

struct Linear {
  int64_t kind = MM;
  std::vector<torch::Tensor> t;   // MM: (weight.t()); ADDMM: (weight.t(), bias); INT8: (q, scales, rowsum);
  int64_t group = 0;              // INT4: (q, scales, lows) and the group size

  torch::Tensor operator()(const torch::Tensor& x) const {
    switch (kind) {
      case MM: return at::mm(x, t[0]);
      case ADDMM: return at::addmm(t[1], x, t[0]);
      default: {       // the kernels take rows of any float dtype and answer float32 (rows_fn)
        torch::Tensor y = kind == INT8 ? int8_gemm(x, t[0], t[1], t[2]) : int4_gemm(x, t[0], t[1], t[2], group);
        return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
      }
    }
  }
};

Linear make_linear(int64_t kind, std::vector<torch::Tensor> t, int64_t group) {
  const size_t need = kind == MM ? 1 : kind == ADDMM ? 2 : 3;
  TORCH_CHECK(kind >= MM && kind <= INT4 && t.size() == need, "a linear of kind ", kind, " needs ", need, " tensors");
  Linear l;
  l.kind = kind;
  l.t = std::move(t);
  l.group = group;
  return l;
}

struct Layer {
  torch::Tensor norm1, norm2;     // RMSNorm weights (float32)
  double eps1, eps2;
  Linear qkv, o, gate_up, down;
  torch::Tensor k_buf, v_buf;     // the cache's (1, Hkv, max_len, Dh) buffers of this block
  int64_t Dh, nq, nk, nv, ffn;    // head width; q, k and v widths; gate (and up) width
};

class Plan {
 public:
  // norms: (norm1, norm2); eps: (eps1, eps2); kinds / groups / tensors: qkv, o, gate_up, down;
  // dims: (Dh, nq, nk, nv, ffn)
  void add_layer(std::vector<torch::Tensor> norms, std::vector<double> eps, std::vector<int64_t> kinds,
                 std::vector<int64_t> groups, std::vector<std::vector<torch::Tensor>> tensors,
                 torch::Tensor k_buf, torch::Tensor v_buf, std::vector<int64_t> dims) {
    TORCH_CHECK(norms.size() == 2 && eps.size() == 2 && kinds.size() == 4 && groups.size() == 4 &&
                tensors.size() == 4 && dims.size() == 5, "add_layer: malformed layer");
    Layer L;
    L.norm1 = norms[0];
    L.norm2 = norms[1];
    L.eps1 = eps[0];
    L.eps2 = eps[1];
    L.qkv = make_linear(kinds[0], tensors[0], groups[0]);
    L.o = make_linear(kinds[1], tensors[1], groups[1]);
    L.gate_up = make_linear(kinds[2], tensors[2], groups[2]);
    L.down = make_linear(kinds[3], tensors[3], groups[3]);
    TORCH_CHECK(k_buf.dim() == 4 && k_buf.size(0) == 1 && v_buf.sizes() == k_buf.sizes(), "cache buffers: (1, Hkv, S, Dh)");
    L.k_buf = k_buf;
    L.v_buf = v_buf;
    L.Dh = dims[0];
    L.nq = dims[1];
    L.nk = dims[2];
    L.nv = dims[3];
    L.ffn = dims[4];
    layers_.push_back(std::move(L));
  }

  void set_head(c10::optional<torch::Tensor> norm, double eps, int64_t kind, std::vector<torch::Tensor> t, int64_t group) {
    head_norm_ = norm;
    head_eps_ = eps;
    head_ = make_linear(kind, std::move(t), group);
    has_head_ = true;
  }

  // h (1, D) hidden state of the next slot at cache position `past`; rope: (cos, signed sin) (1, Dh)
  // of its position or undefined; mask (1, 1, 1, past + 1) or none. -> h (1, D) after every layer,
  // or the logits (1, V) with `head`. `into` (without `head`): a contiguous float32 tensor of D
  // elements (any shape) the result is copied into and returned as, a caller's buffer, once
  // checked finite: none where a value is NaN or infinite (the cache's slot `past` is written then,
  // and the caller does not advance it).
  c10::optional<torch::Tensor> run(torch::Tensor h, int64_t past, c10::optional<torch::Tensor> cos, c10::optional<torch::Tensor> sin,
                    c10::optional<torch::Tensor> mask, bool head, c10::optional<torch::Tensor> into) const {
    TORCH_CHECK(h.dim() == 2 && h.size(0) == 1 && h.scalar_type() == torch::kFloat32, "h: (1, D) float32");
    const int64_t B = 1, end = past + 1;
    const bool rope = cos.has_value();
    for (const Layer& L : layers_) {
      const int64_t Dh = L.Dh, H = L.nq / Dh;
      TORCH_CHECK(end <= L.k_buf.size(2), "the cache is full");
      torch::Tensor x = rms_(h, L.norm1, L.eps1);
      auto parts = L.qkv(x).view({B, -1, Dh}).split_with_sizes({(L.nq + L.nk) / Dh, L.nv / Dh}, 1);
      torch::Tensor qk = parts[0], v = parts[1];
      if (rope) qk = at::addcmul(at::mul(qk, *cos), at::roll(qk, {Dh / 2}, {-1}), *sin);
      L.k_buf.select(2, past).copy_(qk.slice(1, H));
      L.v_buf.select(2, past).copy_(v);
      torch::Tensor q = qk.slice(1, 0, H).unsqueeze(2);
      torch::Tensor k = L.k_buf.narrow(2, 0, end), vv = L.v_buf.narrow(2, 0, end);
      torch::Tensor out = at::scaled_dot_product_attention(q, k, vv, mask, 0.0, false, c10::nullopt, H != k.size(1));
      h = at::add(h, L.o(out.view({B, -1})));
      x = rms_(h, L.norm2, L.eps2);
      torch::Tensor gu = L.gate_up(x);
      torch::Tensor a = at::mul(at::silu(gu.slice(1, 0, L.ffn)), gu.slice(1, L.ffn));
      h = at::add(h, L.down(a));
    }
    if (!head) {
      if (!into.has_value()) return h;
      TORCH_CHECK(into->scalar_type() == torch::kFloat32 && into->is_contiguous() && into->numel() == h.numel(),
                  "into: a contiguous float32 tensor of ", h.numel(), " elements");
      h = h.contiguous();
      const float* v = h.data_ptr<float>();
      for (int64_t i = 0, n = h.numel(); i < n; ++i)
        if (!std::isfinite(v[i])) return c10::nullopt;
      into->view({1, -1}).copy_(h);
      return *into;
    }
    TORCH_CHECK(!into.has_value(), "into is for the hidden states, not the logits");
    TORCH_CHECK(has_head_, "this plan has no head");
    if (head_norm_.has_value()) h = rms_(h, *head_norm_, head_eps_);
    return head_(h);
  }

 private:
  std::vector<Layer> layers_;
  mutable RmsNorm rms_;          // its buffers: one call at a time per plan (a plan serves one cache)
  c10::optional<torch::Tensor> head_norm_;
  double head_eps_ = 0;
  Linear head_;
  bool has_head_ = false;
};

}  // namespace

torch::Tensor rms_norm_steps(torch::Tensor x, torch::Tensor weight, double eps) {   // for the tests
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (B, D) float32");
  RmsNorm rms;
  return rms(x, weight, eps).clone();
}

void bind_decode(pybind11::module& m) {
  m.def("rms_norm_steps", &rms_norm_steps, "torch.rms_norm of float32 rows, the compiled step's way");
  pybind11::class_<Plan>(m, "DecodePlan")
      .def(pybind11::init<>())
      .def("add_layer", &Plan::add_layer)
      .def("set_head", &Plan::set_head)
      .def("run", &Plan::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
