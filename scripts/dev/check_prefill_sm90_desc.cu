// Host check (not part of the build) of the sm90 prefill kernel's shared-memory operands
// against CuTe's own definitions: for V (MN-major B of O += P V) and K / Q (K-major operands of
// S = Q K^T) it compares CuTe's swizzled address of every element with the kernel's panel
// formula, and CuTe's make_gmma_desc (layout type, LBO, SBO, start offset per k-step) with the
// values csrc/mla/prefill/ hard-codes. Exit status 0 = all equal. CuTe prints
// "cast_smem_ptr_to_uint not supported" on the host; the start offsets are taken from pointers.
//
//   CUTE=.venv/lib/python3.11/site-packages/cutlass_library/source/include
//   nvcc -std=c++17 -I$CUTE -o /tmp/desc_check scripts/dev/check_prefill_sm90_desc.cu && /tmp/desc_check
#include <cstdio>
#include <cstdint>
#include <cute/tensor.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
using namespace cute;
using bf16 = cutlass::bfloat16_t;

// The kernel's physical placement (bytes) of element (row r, col c) of a panelled operand:
// panels of [128 rows][64 cols], 128-byte rows, 16-byte chunk index XOR (row % 8).
// CuTe keeps the swizzle in the smem pointer: the element's address is taken from a tensor
// built on a 1024-byte aligned buffer, which applies the swizzle to the real address.
int mine(int r, int c) {
  int panel = c / 64, cc = c % 64;
  int chunk = (cc / 8) ^ (r % 8);
  return panel * 16384 + r * 128 + chunk * 16 + (cc % 8) * 2;
}

alignas(1024) static bf16 buf[128 * 256];
int main() {
  int bad = 0;
  auto base = make_smem_ptr(buf);
  // ---- V as B of O += P V: (N = 128 value dims, K = 128 keys), MN-major ----
  auto v_layout = tile_to_shape(GMMA::Layout_MN_SW128_Atom<bf16>{}, Shape<_128, _128>{}, Step<_2, _1>{});
  for (int n = 0; n < 128; ++n)
    for (int k = 0; k < 128; ++k)
      if (int(&make_tensor(base, v_layout)(n, k) - buf) * 2 != mine(k, n)) { if (bad++ < 5) printf("V mismatch n=%d k=%d\n", n, k); }
  print("V layout: "); print(v_layout); printf("\n");
  for (int kk = 0; kk < 8; ++kk) {
    auto t = make_tensor(base, v_layout);
    auto slice = local_tile(t, Shape<_128, _16>{}, make_coord(0, kk));
    auto d = GMMA::make_gmma_desc<GMMA::Major::MN>(slice);
    uint32_t start = uint32_t((raw_pointer_cast(slice.data()) - buf) * 2);
    printf("V kk=%d: layout_type=%d LBO=%d B SBO=%d B start_off=%u B (mine: LBO 16384, SBO 1024, start %d)\n", kk,
           int(d.bitfield.layout_type_), int(d.bitfield.leading_byte_offset_) * 16, int(d.bitfield.stride_byte_offset_) * 16,
           start, kk * 2048);
  }
  // ---- K as B of S = Q K^T: (N = 128 keys, K = 192 dims), K-major; Q as A likewise (M = 128 rows) ----
  auto k_layout = tile_to_shape(GMMA::Layout_K_SW128_Atom<bf16>{}, Shape<_128, _192>{});
  for (int r = 0; r < 128; ++r)
    for (int c = 0; c < 192; ++c)
      if (int(&make_tensor(base, k_layout)(r, c) - buf) * 2 != mine(r, c)) { if (bad++ < 10) printf("K mismatch r=%d c=%d\n", r, c); }
  for (int kk = 0; kk < 12; ++kk) {
    auto t = make_tensor(base, k_layout);
    auto slice = local_tile(t, Shape<_128, _16>{}, make_coord(0, kk));
    auto d = GMMA::make_gmma_desc<GMMA::Major::K>(slice);
    uint32_t start = uint32_t((raw_pointer_cast(slice.data()) - buf) * 2);
    printf("K kk=%2d: layout_type=%d LBO=%d SBO=%d B start_off=%u B (mine: SBO 1024, start %d)\n", kk,
           int(d.bitfield.layout_type_), int(d.bitfield.leading_byte_offset_), int(d.bitfield.stride_byte_offset_) * 16, start,
           (kk / 4) * 16384 + (kk % 4) * 32);
  }
  // Q of consumer warpgroup 1: rows 64..127 of each panel.
  {
    auto t = make_tensor(base, k_layout);
    auto slice = local_tile(t, Shape<_64, _16>{}, make_coord(1, 5));
    auto d = GMMA::make_gmma_desc<GMMA::Major::K>(slice);
    uint32_t start = uint32_t((raw_pointer_cast(slice.data()) - buf) * 2);
    printf("Q wg1 kk=5: SBO=%d B start_off=%u B (mine: %d)\n", int(d.bitfield.stride_byte_offset_) * 16, start, 8192 + 16384 + 32);
  }
  printf("layout mismatches: %d\n", bad);
  return bad != 0;
}
