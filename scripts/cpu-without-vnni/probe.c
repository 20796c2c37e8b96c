/* Prints the vector features CPUID reports, as a library choosing its kernels would read them. */
#include <cpuid.h>
#include <stdio.h>

int main(void) {
    unsigned a, b, c, d, a1 = 0, b1, c1, d1;
    __cpuid_count(7, 0, a, b, c, d);
    if (a >= 1)
        __cpuid_count(7, 1, a1, b1, c1, d1);
    printf("avx2=%u avx512f=%u avx512bw=%u avx512_vnni=%u avx_vnni=%u amx_int8=%u\n", (b >> 5) & 1, (b >> 16) & 1,
           (b >> 30) & 1, (c >> 11) & 1, (a1 >> 4) & 1, (d >> 25) & 1);
    return 0;
}
