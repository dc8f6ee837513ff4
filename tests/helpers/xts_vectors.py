"""XTS test data shared by the engine tests: the IEEE 1619 vector, the
content format's boundary lengths, page-aligned copies of a buffer."""

from __future__ import annotations

from cryptfs.engines.base import PAGE_SIZE, aligned_buffer

PATTERN = bytes(range(256)) * 2

# IEEE 1619-2007 XTS-AES-256 vector 10: Key1 || Key2, data unit number 0xff.
V10_KEY = bytes.fromhex(
    "2718281828459045235360287471352662497757247093699959574966967627"
    "3141592653589793238462643383279502884197169399375105820974944592"
)
V10_CT = bytes.fromhex(
    "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b"
    "5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd"
    "5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0"
    "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca"
    "2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0"
    "b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f"
    "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec"
    "583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a"
    "84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1"
    "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae"
    "9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29"
    "a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac"
    "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f"
    "645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385"
    "1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa"
    "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151"
)


# Every length the content format produces at its edges: tiny final units
# (1..15 plaintext bytes + 16-byte trailer), page boundaries +-1, a final
# page plus trailer spilling into the next page, segment (16-page) edges.
BOUNDARY_LENGTHS = sorted({
    16, 17, 20, 31, 32, 33, 4095, 4096, 4097, 4111, 4112,
    2 * PAGE_SIZE - 1, 2 * PAGE_SIZE, 2 * PAGE_SIZE + 1, 2 * PAGE_SIZE + 16,
    16 * PAGE_SIZE, 16 * PAGE_SIZE + 16, 17 * PAGE_SIZE + 100, 40 * PAGE_SIZE + 4112 - 4096,
})


def aligned(data: bytes):
    buf = aligned_buffer(len(data))
    buf[:] = data
    return buf
