/*
 * kvm_pio_loop: the floor for port-I/O exit cost on this host.
 *
 * One VM, one vCPU in real mode running `out 0x80, al; jmp back` with no devices and no
 * irqchip; the loop counts KVM_EXIT_IO exits for a fixed time (default 1 s) and prints
 *   bare_exits=N bare_ns=NS bare_per_sec=R
 * Built by ferro-bench at bench time with `cc -O2`. Usage: kvm_pio_loop [SECONDS]
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE 0x10000
#define CODE_AT 0x1000

static void die(const char *what)
{
	fprintf(stderr, "kvm_pio_loop: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	double secs = argc > 1 ? atof(argv[1]) : 1.0;
	if (secs <= 0)
		secs = 1.0;

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("open /dev/kvm");
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM");
	/* Needed for real mode on VMX without unrestricted guest; harmless elsewhere. */
	(void)ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000ul);

	uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory");
	/* out 0x80, al ; jmp -4 (back to the out) */
	static const uint8_t code[] = {0xe6, 0x80, 0xeb, 0xfc};
	memcpy(mem + CODE_AT, code, sizeof(code));

	struct kvm_userspace_memory_region region = {
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = MEM_SIZE,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < (int)sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, (size_t)run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");

	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs;
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_AT;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	uint64_t budget = (uint64_t)(secs * 1e9);
	uint64_t exits = 0;
	uint64_t t0 = now_ns(), t = t0;
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x80) {
			fprintf(stderr, "kvm_pio_loop: unexpected exit reason %u (after %llu port exits)\n",
				run->exit_reason, (unsigned long long)exits);
			return 1;
		}
		exits++;
		if ((exits & 255) == 0) {
			t = now_ns();
			if (t - t0 >= budget)
				break;
		}
	}
	uint64_t ns = t - t0;
	printf("bare_exits=%llu bare_ns=%llu bare_per_sec=%llu\n", (unsigned long long)exits,
	       (unsigned long long)ns, (unsigned long long)(exits * 1000000000ull / (ns ? ns : 1)));
	return 0;
}
