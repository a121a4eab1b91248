// The program's version, as in package.json (test/unit/start-up.test.ts holds them equal).
export const VERSION = '0.1.0';
